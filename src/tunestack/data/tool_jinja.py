"""The jinja preamble of a named tool format: saved in front of a model's chat template, it rewrites a conversation
with tools exactly as `tunestack.data.tool_formats.lower` does, so ``apply_chat_template(messages, tools=...)``
renders what training rendered, in tunestack or in any other reader of the model folder."""

from __future__ import annotations

import re

from tunestack.data.tool_formats import ToolFormat, lit


def jinja_preamble(fmt: ToolFormat, default_system: str | None = None) -> str:
    """Jinja that rewrites `messages` (and empties `tools`) exactly as `lower` does, for the template after it."""
    before, one_tool, after = fmt.jinja_tools()
    after = after or "''"
    flush = "{%- set _ts.msgs = _ts.msgs + [{'role': 'user', 'content': _ts.results}] -%}{%- set _ts.results = none -%}"
    result = f"{lit(fmt.result_prefix)} + (_ts_m['content'] or '') + {lit(fmt.result_suffix)}"
    default = lit(default_system) if default_system else "none"
    return "".join(
        [
            f"{{#- tunestack tool_format: {fmt.name} -#}}",
            "{%- set _ts = namespace(msgs=[], results=none, sys=none, text='', calls='', names='') -%}",
            "{%- if messages and messages[0]['role'] == 'system' -%}",
            "{%- set _ts.sys = messages[0]['content'] -%}{%- set _ts_rest = messages[1:] -%}",
            f"{{%- else -%}}{{%- set _ts_rest = messages -%}}{{%- if tools is defined and tools -%}}"
            f"{{%- set _ts.sys = {default} -%}}{{%- endif -%}}{{%- endif -%}}",
            "{%- if tools is defined and tools -%}{%- for _ts_t in tools -%}",
            "{%- set _ts_f = _ts_t['function'] if _ts_t['function'] is defined else _ts_t -%}",
            f"{{%- set _ts.text = _ts.text + {one_tool} -%}}",
            "{%- set _ts.names = _ts.names + (', ' if not loop.first else '') + _ts_f['name'] -%}",
            "{%- endfor -%}",
            f"{{%- set _ts.text = {before} + _ts.text + {after} -%}}",
            "{%- set _ts.sys = (_ts.sys + '\\n\\n' + _ts.text) if _ts.sys else _ts.text -%}",
            "{%- endif -%}",
            "{%- for _ts_m in _ts_rest -%}",
            "{%- if _ts_m['role'] == 'tool' -%}",
            f"{{%- set _ts.results = ((_ts.results + '\\n') if _ts.results is not none else '') + {result} -%}}",
            "{%- else -%}",
            f"{{%- if _ts.results is not none -%}}{flush}{{%- endif -%}}",
            "{%- if _ts_m['role'] == 'assistant' and _ts_m['tool_calls'] is defined and _ts_m['tool_calls'] -%}",
            "{%- set _ts.calls = '' -%}",
            "{%- for _ts_call in _ts_m['tool_calls'] -%}",
            "{%- set _ts_g = _ts_call['function'] if _ts_call['function'] is defined else _ts_call -%}",
            "{%- set _ts_c = _ts_g['name'] -%}",
            "{%- set _ts_a = _ts_g['arguments'] if _ts_g['arguments'] is string else (_ts_g['arguments']|tojson) -%}",
            f"{{%- set _ts.calls = _ts.calls + ('\\n' if not loop.first else '') + {fmt.jinja_call()} -%}}",
            "{%- endfor -%}",
            "{%- set _ts_body = (_ts_m['content'] or '')|trim -%}",
            "{%- set _ts.msgs = _ts.msgs + [{'role': 'assistant', "
            "'content': (_ts_body + '\\n' + _ts.calls) if _ts_body else _ts.calls}] -%}",
            "{%- else -%}",
            "{%- set _ts.msgs = _ts.msgs + [{'role': _ts_m['role'], 'content': _ts_m['content']}] -%}",
            "{%- endif -%}{%- endif -%}{%- endfor -%}",
            f"{{%- if _ts.results is not none -%}}{flush}{{%- endif -%}}",
            "{%- set messages = ([{'role': 'system', 'content': _ts.sys}] if _ts.sys is not none else []) "
            "+ _ts.msgs -%}",
            "{%- set tools = none -%}",
        ]
    )


def preamble_format(source: str) -> str | None:
    """The tool format whose preamble opens a saved chat template, or None."""
    m = re.match(r"\{#- tunestack tool_format: ([a-z0-9]+) -#\}", source)
    return m.group(1) if m else None
