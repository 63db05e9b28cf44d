"""`tunestack export`: GGUF files read back by an independent reader (transformers' GGUF loader), the Ollama
Modelfile rendered by Go's text/template, and sharded safetensors folders loaded by plain transformers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import tiny  # tests/fixtures, on sys.path from conftest
import torch

from tunestack.data.templates import get_template, jinja_chat_template, named_templates, render_prompt

# Row lengths 64 (Q8_0/Q4_0 blocks of 32 fit) and 80 (ffn_down: they do not, so it stays F16).
# A larger initializer than the default 0.02 makes attention sharp, so RoPE and the Q/K layout change the logits.
SIZES = {
    "hidden_size": 64, "intermediate_size": 80, "num_attention_heads": 4, "num_key_value_heads": 2,
    "initializer_range": 0.2,
}  # fmt: skip
PROMPTS = [
    "The heart pumps blood through the arteries",
    "What is the capital of France? The capital",
    "心脏通过动脉和静脉把血液输送到全身。",
    "Aspirin reduces fever and pain; it also",
    "Who are you? I am an assistant that answers medical questions. Drink water, sleep well, and walk every day",
    "0 1 2 3 4 5 6 7 8 9 + - = ? ! , . : ;",
]
MIXED_TEXT = "The heart pumps blood. 心脏通过动脉和静脉把血液输送到全身。<|im_start|>Drink water 🦙, 3.14!\n  end"
# The GGUF model must compute what the source computes with its weights rounded to f16: the same logits up to
# float32 summation order (EXACT_REL). Against the float32 source itself the f16 rounding (2^-11 relative per
# weight) moves the logits of these sharp tiny models by up to ~3e-3 of the largest logit (F16_REL).
EXACT_REL = 1e-5
F16_REL = 5e-3
GO = shutil.which("go")
RENDER_GO = Path(__file__).parents[1] / "fixtures" / "ollama_render.go"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny models for export: llama (tied embeddings), qwen2 (untied, q/k/v biases), llama with Llama-3 RoPE,
    llama with a SentencePiece-style tokenizer and the mistral template; glm4 (not exportable as GGUF)."""
    root = tmp_path_factory.mktemp("export_models")
    tiny.build_tokenizer(root / "tok")
    mistral = jinja_chat_template(named_templates()["mistral"])
    tiny.build_spm_tokenizer(root / "spm_tok", chat_template=mistral)
    return {
        "llama": tiny.build_model(root / "llama", "llama", root / "tok", **SIZES),
        "qwen2": tiny.build_model(root / "qwen2", "qwen2", root / "tok", seed=1, tie_word_embeddings=False, **SIZES),
        "llama3": tiny.build_model(root / "llama3", "llama", root / "tok", seed=2, **SIZES, **tiny.LLAMA3_ROPE),
        "spm": tiny.build_model(root / "spm", "llama", root / "spm_tok", seed=3, **SIZES),
        "glm4": tiny.build_model(root / "glm4", "glm4", root / "tok"),
        # Mistral is written as llama.cpp's `llama`; Qwen3 with its q/k norms and a head_dim of its own (128, the
        # one transformers' GGUF reader assumes: it does not read attention.key_length for qwen3).
        "mistral": tiny.build_model(root / "tiny-mistral", "mistral", root / "tok", seed=4, **SIZES),
        "qwen3": tiny.build_model(
            root / "qwen3",
            "qwen3",
            root / "tok",
            seed=5,
            **{**SIZES, "head_dim": 128, "num_attention_heads": 2, "num_key_value_heads": 1},
        ),
    }


def export(cli, *argv: Any) -> tuple[int, str, str]:
    return cli("export", *argv)


def logits(model: Any, tokenizer: Any, text: str) -> torch.Tensor:
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        return model(input_ids=ids).logits[0].float()


def load_pair(source: Path, folder: Path, gguf_file: str, **gguf_kwargs: Any) -> tuple[Any, Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    back = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32, **gguf_kwargs).eval()
    return src, back, AutoTokenizer.from_pretrained(source)


def rounded(model: Any, dtype: torch.dtype) -> Any:
    """A copy of `model` whose weights are rounded to `dtype` and back (what an f16 / bf16 file holds)."""
    import copy

    out = copy.deepcopy(model)
    with torch.no_grad():
        for param in out.parameters():
            param.copy_(param.to(dtype).float())
    return out


def close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    return float((a - b).abs().max()) <= rel * max(1.0, float(a.abs().max()))


def tensor_types(path: Path) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


# ---------------------------------------------------------------------------------------------
# Round trips through transformers' GGUF loader


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_f16_logits_match_the_source(models, tmp_path, cli, family) -> None:
    out = tmp_path / "gguf"
    code, stdout, err = export(cli, "--model", models[family], "--quantization", "f16", "--output_dir", out)
    assert code == 0, err
    assert f"wrote {out / f'{family}-f16.gguf'}" in stdout and "read back: " in stdout
    types = tensor_types(out / f"{family}-f16.gguf")
    assert {n for n, t in types.items() if t == "F32"} == {n for n in types if n.endswith(("norm.weight", ".bias"))}
    assert ("output.weight" in types) == (family == "qwen2")  # a tied output layer is token_embd itself
    src, back, tok = load_pair(models[family], out, f"{family}-f16.gguf")
    assert type(back) is type(src)
    src16 = rounded(src, torch.float16)
    for text in PROMPTS:
        b = logits(back, tok, text)
        assert close(logits(src16, tok, text), b, EXACT_REL), text
        assert close(logits(src, tok, text), b, F16_REL), text


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_q8_0_keeps_the_top_token_and_leaves_short_rows_f16(models, tmp_path, cli, family) -> None:
    out = tmp_path / "gguf"
    assert export(cli, "--model", models[family], "--quantization", "q8_0", "--output_dir", out)[0] == 0
    types = tensor_types(out / f"{family}-q8_0.gguf")
    assert {n for n, t in types.items() if t == "F16"} == {"blk.0.ffn_down.weight", "blk.1.ffn_down.weight"}
    assert types["token_embd.weight"] == types["blk.0.attn_q.weight"] == types["blk.1.ffn_up.weight"] == "Q8_0"
    src, back, tok = load_pair(models[family], out, f"{family}-q8_0.gguf")
    for text in PROMPTS:
        assert int(logits(src, tok, text)[-1].argmax()) == int(logits(back, tok, text)[-1].argmax()), text


@pytest.mark.parametrize("family", ["mistral", "qwen3"])
def test_f32_is_exact_and_bf16_is_the_rounded_model(models, tmp_path, cli, family) -> None:
    stem = models[family].name
    for quantization in ("f32", "bf16"):
        assert export(cli, "--model", models[family], "--quantization", quantization, "--output_dir", tmp_path)[0] == 0
    types = tensor_types(tmp_path / f"{stem}-bf16.gguf")
    assert {t for n, t in types.items() if not n.endswith("norm.weight")} == {"BF16"}
    src, back32, tok = load_pair(models[family], tmp_path, f"{stem}-f32.gguf")
    _, back16, _ = load_pair(models[family], tmp_path, f"{stem}-bf16.gguf")
    src16 = rounded(src, torch.bfloat16)
    for text in PROMPTS:
        assert torch.equal(logits(src, tok, text), logits(back32, tok, text)), text
        assert close(logits(src16, tok, text), logits(back16, tok, text), EXACT_REL), text


def test_q4_0_keeps_the_output_layer_at_q8_0(models, tmp_path, cli) -> None:
    out = tmp_path / "gguf"
    assert export(cli, "--model", models["qwen2"], "--quantization", "q4_0", "--output_dir", out)[0] == 0
    types = tensor_types(out / "qwen2-q4_0.gguf")
    assert types["output.weight"] == "Q8_0"
    assert types["token_embd.weight"] == types["blk.0.attn_k.weight"] == "Q4_0"
    assert types["blk.0.ffn_down.weight"] == "F16"
    src, back, tok = load_pair(models["qwen2"], out, "qwen2-q4_0.gguf")
    a, b = logits(src, tok, PROMPTS[0]), logits(back, tok, PROMPTS[0])
    assert torch.corrcoef(torch.stack([a.reshape(-1), b.reshape(-1)]))[0, 1] > 0.8  # 4-bit: the same model, coarsely


def test_the_llama_q_k_permutation_is_what_readers_expect(models, tmp_path, cli, monkeypatch) -> None:
    """Without the row permutation the same reader gets a different model: the check above can fail."""
    from tunestack.export import gguf_arch

    monkeypatch.setitem(gguf_arch.ARCHITECTURES, "llama", gguf_arch.Architecture("LLAMA", permute_qk=False))
    out = tmp_path / "gguf"
    assert export(cli, "--model", models["llama"], "--output_dir", out)[0] == 0
    src, back, tok = load_pair(models["llama"], out, "llama-f16.gguf")
    a, b = logits(src, tok, PROMPTS[4]), logits(back, tok, PROMPTS[4])
    assert not close(a, b, 10 * F16_REL)


def test_llama3_rope_is_written_as_rope_freqs(models, tmp_path, cli) -> None:
    import gguf
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    out = tmp_path / "gguf"
    assert export(cli, "--model", models["llama3"], "--output_dir", out)[0] == 0
    reader = gguf.GGUFReader(out / "llama3-f16.gguf")
    (freqs,) = [t for t in reader.tensors if t.name == "rope_freqs.weight"]
    assert freqs.tensor_type.name == "F32"
    # llama.cpp divides each base frequency by its factor; transformers' llama3 RoPE must give the same frequencies.
    config = AutoConfig.from_pretrained(models["llama3"])
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    dim = config.hidden_size // config.num_attention_heads
    base = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    assert torch.allclose(base / torch.from_numpy(freqs.data.copy()), inv_freq, rtol=1e-6)
    assert {float(x) for x in freqs.data} >= {1.0, 8.0} and len({float(x) for x in freqs.data}) > 2  # all three bands
    # transformers' GGUF reader does not read rope_freqs, so the scaling comes from the source config here;
    # every weight comes from the file. 200 positions: past the original context of 64, where the scaling acts.
    src, back, tok = load_pair(models["llama3"], out, "llama3-f16.gguf", config=config)
    text = " ".join(PROMPTS * 3)
    b = logits(back, tok, text)
    assert b.shape[0] > 150
    assert close(logits(rounded(src, torch.float16), tok, text), b, EXACT_REL)


@pytest.mark.parametrize("family", ["llama", "spm"])
def test_the_gguf_tokenizer_encodes_like_ours(models, tmp_path, cli, family) -> None:
    """Byte-level BPE (tokenizer.ggml.pre found by behaviour) and SentencePiece-style BPE with byte fallback."""
    import gguf
    from transformers import AutoTokenizer

    out = tmp_path / "gguf"
    assert export(cli, "--model", models[family], "--output_dir", out)[0] == 0
    ours = AutoTokenizer.from_pretrained(models[family])
    back = AutoTokenizer.from_pretrained(out, gguf_file=f"{family}-f16.gguf")
    for text in (MIXED_TEXT, *PROMPTS):
        assert back(text)["input_ids"] == ours(text)["input_ids"], text
        assert back.decode(back(text)["input_ids"], skip_special_tokens=True) == ours.decode(
            ours(text)["input_ids"], skip_special_tokens=True
        )
    fields = gguf.GGUFReader(out / f"{family}-f16.gguf").fields
    meta = {k: fields[k].contents() for k in fields if k.startswith("tokenizer.") and "tokens" not in k}
    assert (meta["tokenizer.ggml.model"], meta.get("tokenizer.ggml.pre")) == (
        ("gpt2", "gpt-2") if family == "llama" else ("llama", None)
    )
    assert meta["tokenizer.ggml.add_bos_token"] is (family == "spm")
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (
        ours.bos_token_id,
        ours.eos_token_id,
    )
    assert meta["tokenizer.chat_template"] == ours.chat_template


# ---------------------------------------------------------------------------------------------
# llama.cpp itself

NODE_LLAMA_CPP = os.environ.get("TUNESTACK_NODE_LLAMA_CPP")  # the node-llama-cpp package folder (npm i node-llama-cpp)
LLAMA_CPP_CHECK = Path(__file__).parents[1] / "fixtures" / "llama_cpp_check.mjs"


@pytest.mark.skipif(
    not (NODE_LLAMA_CPP and shutil.which("node")),
    reason="set TUNESTACK_NODE_LLAMA_CPP to a node-llama-cpp package folder (npm i node-llama-cpp) to run llama.cpp",
)
@pytest.mark.parametrize("family", ["llama", "qwen2", "llama3", "spm", "mistral", "qwen3"])
def test_llama_cpp_tokenizes_and_generates_like_the_source(models, tmp_path, cli, family) -> None:
    """The real consumer: llama.cpp loads the f32 file, splits text into the same token ids as our tokenizer and
    continues a prompt with the same greedy tokens as the source model (Q/K layout, rope_freqs, norms, vocab)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert export(cli, "--model", models[family], "--quantization", "f32", "--output_dir", tmp_path)[0] == 0
    tok = AutoTokenizer.from_pretrained(models[family])
    src = AutoModelForCausalLM.from_pretrained(models[family], dtype=torch.float32).eval()
    prompt = tok(" ".join(PROMPTS), add_special_tokens=True)["input_ids"]  # ~100 tokens: past llama3's 64
    request = {"model": str(tmp_path / f"{models[family].name}-f32.gguf"), "texts": [MIXED_TEXT, *PROMPTS],
               "prompt": prompt, "new_tokens": 12}  # fmt: skip
    done = subprocess.run(["node", str(LLAMA_CPP_CHECK)], input=json.dumps(request), capture_output=True, text=True,
                          env={**os.environ, "TUNESTACK_NODE_LLAMA_CPP": NODE_LLAMA_CPP}, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ids"] == [tok(t, add_special_tokens=False)["input_ids"] for t in [MIXED_TEXT, *PROMPTS]]
    with torch.inference_mode():
        greedy = src.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert result["greedy"] == greedy[0, len(prompt) :].tolist()


# ---------------------------------------------------------------------------------------------
# Adapters, the Modelfile


def make_stage_output(base: Path, out: Path, system_prompt: str, task_type: str = "CAUSAL_LM") -> Path:
    """A LoRA adapter of `base` saved as a stage output (run.json naming base and system prompt)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    if task_type == "SEQ_CLS":
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    else:
        model = AutoModelForCausalLM.from_pretrained(base)
    lora = LoraConfig(task_type=task_type, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.2)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    manifest = {"stage": "sft" if task_type == "CAUSAL_LM" else "rm", "base_model": str(base), "status": "complete",
                "tuning_method": "lora", "options": {"data": {"system_prompt": system_prompt}}}  # fmt: skip
    (out / "run.json").write_text(json.dumps(manifest))
    return out


def live(base: Path, adapter: Path) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()


def test_a_stage_output_is_merged_first_and_keeps_its_system_prompt(models, tmp_path, cli) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stage = make_stage_output(models["llama"], tmp_path / "sft", "You answer medical questions briefly.")
    out = tmp_path / "gguf"
    code, stdout, err = export(cli, "--model", stage, "--quantization", "f16", "--output_dir", out)
    assert code == 0, err
    assert "after merging the adapter" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "export.json", "sft-f16.gguf"]
    assert not list(tmp_path.glob(".export-merge-*"))  # the merged scratch folder is gone
    tok = AutoTokenizer.from_pretrained(stage)
    back = AutoModelForCausalLM.from_pretrained(out, gguf_file="sft-f16.gguf", dtype=torch.float32).eval()
    model = live(models["llama"], stage)
    for text in PROMPTS[:3]:
        a, b = logits(model, tok, text), logits(back, tok, text)
        assert close(a, b, F16_REL)
        assert (logits(AutoModelForCausalLM.from_pretrained(models["llama"]), tok, text) - a).abs().max() > 1e-2
    modelfile = (out / "Modelfile").read_text()
    assert 'SYSTEM """You answer medical questions briefly."""' in modelfile
    assert "FROM ./sft-f16.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile


def go_render(cases: list[tuple[Path, list[dict[str, str]]]]) -> list[str]:
    request = [{"modelfile": str(modelfile), "messages": messages} for modelfile, messages in cases]
    done = subprocess.run(
        [GO, "run", str(RENDER_GO)], input=json.dumps(request), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


TWO_TURNS = [
    {"role": "user", "content": "Hi, I have a fever."},
    {"role": "assistant", "content": "How high is it? {{ .System }} stays text."},
    {"role": "user", "content": "病人发烧39度，怎么办？"},
]
SYSTEM = "You are a careful medical assistant.\nAnswer briefly."


@pytest.mark.skipif(GO is None, reason="needs the Go toolchain (apt-get install golang-go) to run text/template")
def test_the_modelfile_template_renders_like_our_template(models, tmp_path, cli) -> None:
    """Ollama's template language, run by Go itself: a two-turn conversation with a system prompt (in the
    conversation, from the Modelfile's SYSTEM, or none) renders to exactly our prompt text; with the tokenizer's
    chat template (ChatML), and with the SentencePiece model's mistral template (system inside the first user turn,
    BOS left to the runtime)."""
    from transformers import AutoTokenizer

    cases, expected = [], []
    for family in ("llama", "spm"):
        out = tmp_path / family
        assert export(cli, "--model", models[family], "--output_dir", out, "--system_prompt", SYSTEM)[0] == 0
        tok = AutoTokenizer.from_pretrained(models[family])
        template = get_template(None, tok)
        ours = render_prompt(template, tok, TWO_TURNS, SYSTEM)
        if family == "spm":  # the tokenizer adds BOS itself (add_bos_token in the GGUF), so the template omits it
            assert ours.startswith(tok.bos_token)
            ours = ours.removeprefix(tok.bos_token)
        cases += [
            (out / "Modelfile", [{"role": "system", "content": SYSTEM}, *TWO_TURNS]),
            (out / "Modelfile", TWO_TURNS),
        ]
        expected += [ours, ours]
    no_system = tmp_path / "no_system"
    assert export(cli, "--model", models["llama"], "--output_dir", no_system)[0] == 0
    tok = AutoTokenizer.from_pretrained(models["llama"])
    cases.append((no_system / "Modelfile", TWO_TURNS))
    expected.append(render_prompt(get_template(None, tok), tok, TWO_TURNS))
    assert go_render(cases) == expected


@pytest.mark.skipif(GO is None, reason="needs the Go toolchain (apt-get install golang-go) to run text/template")
def test_every_named_template_has_an_exact_ollama_template(tmp_path) -> None:
    from types import SimpleNamespace

    from tunestack.data.templates import NamedTemplate
    from tunestack.export.ollama import go_template, modelfile_text

    tok = SimpleNamespace(bos_token="<s>", eos_token="</s>")
    # and a template whose own text looks like Go template syntax
    braces = NamedTemplate(name="braces", system="{{sys}} {content}}\n", user="{{user}}: {content}\n{", stop="}}{eos}",
                           assistant_header="{{ .Assistant }}: ", separator="\n")  # fmt: skip
    cases, expected = [], []
    for name, template in {**{t.name: t for t in named_templates().values()}, "braces": braces}.items():
        path = tmp_path / f"{name}.Modelfile"
        path.write_text(modelfile_text("m.gguf", go_template(template, tok, False), template.default_system, []))
        for system in (SYSTEM, None):
            messages = ([{"role": "system", "content": system}] if system else []) + TWO_TURNS
            cases.append((path, messages))
            expected.append(render_prompt(template, tok, TWO_TURNS, system))
    assert go_render(cases) == expected


# ---------------------------------------------------------------------------------------------
# safetensors


def test_a_sharded_safetensors_export_loads_in_plain_transformers(models, tmp_path, cli) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    stage = make_stage_output(models["qwen2"], tmp_path / "sft", "Be brief.")
    out = tmp_path / "hf"
    code, stdout, err = export(cli, "--model", stage, "--format", "safetensors", "--max_shard_size", "60KB",
                               "--output_dir", out)  # fmt: skip
    assert code == 0, err
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {p.name for p in shards}
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == AutoTokenizer.from_pretrained(stage).chat_template
    assert GenerationConfig.from_pretrained(out).eos_token_id == tok.eos_token_id
    in_memory = live(models["qwen2"], stage).merge_and_unload()  # the same float32 merge, never saved
    for text in PROMPTS:
        assert torch.equal(logits(merged, tok, text), logits(in_memory, tok, text)), text

    # A model without adapters is re-sharded the same way, weights unchanged.
    plain = tmp_path / "plain"
    code, stdout, err = export(cli, "--model", models["llama"], "--format", "safetensors", "--max_shard_size", "60KB",
                               "--output_dir", plain)  # fmt: skip
    assert code == 0, err
    assert "model.safetensors.index.json" in stdout
    src = AutoModelForCausalLM.from_pretrained(models["llama"], dtype=torch.float32).eval()
    again = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32).eval()
    for text in PROMPTS:
        assert torch.equal(logits(src, tok, text), logits(again, tok, text))


# ---------------------------------------------------------------------------------------------
# Errors and integrity


def test_errors_are_one_line_exit_2(models, tmp_path, cli, capsys) -> None:
    rm = make_stage_output(models["llama"], tmp_path / "rm", "", task_type="SEQ_CLS")
    capsys.readouterr()  # the adapter's own loading output
    out = tmp_path / "gguf"
    code, _, err = export(cli, "--model", models["glm4"], "--output_dir", out)
    assert code == 2
    assert err == (
        "tunestack export: error: GGUF export does not support the architecture 'glm4' (Glm4ForCausalLM); "
        "supported: llama, mistral, qwen2, qwen3. `--format safetensors` exports any model\n"
    )
    code, _, err = export(cli, "--model", models["llama"], "--quantization", "q4_k_m", "--output_dir", out)
    assert code == 2
    assert err == (
        "tunestack export: error: --quantization q4_k_m: tunestack writes f32, f16, bf16, q8_0, q4_0; Q4_K_M comes "
        f"from llama.cpp's quantizer: export --quantization f16, then run: llama-quantize {out}/llama-f16.gguf "
        f"{out}/llama-q4_k_m.gguf Q4_K_M\n"
    )
    code, _, err = export(cli, "--model", models["llama"], "--quantization", "q3", "--output_dir", out)
    assert (code, err) == (
        2,
        "tunestack export: error: --quantization q3: expected one of f32, f16, bf16, q8_0, q4_0\n",
    )
    code, _, err = export(cli, "--model", rm, "--output_dir", out)
    assert (code, err) == (
        2,
        f"tunestack export: error: {rm} is a reward model adapter, which has no GGUF form; use --format safetensors\n",
    )
    assert not out.exists()


def test_only_files_of_an_earlier_export_are_replaced(models, tmp_path, cli) -> None:
    out = tmp_path / "gguf"
    out.mkdir()
    mine = out / "llama-f16.gguf"
    mine.write_bytes(b"somebody else's file")
    code, _, err = export(cli, "--model", models["llama"], "--output_dir", out)
    assert code == 2 and err == (
        f"tunestack export: error: {mine} exists and is not a file an earlier tunestack export wrote; remove it or "
        "choose another --output_dir\n"
    )
    assert mine.read_bytes() == b"somebody else's file"
    mine.unlink()
    assert export(cli, "--model", models["llama"], "--output_dir", out)[0] == 0
    first = mine.stat().st_mtime_ns
    assert export(cli, "--model", models["llama"], "--output_dir", out)[0] == 0  # an earlier export: replaced
    assert mine.stat().st_mtime_ns != first
    (out / "Modelfile").write_text("FROM ./llama-f16.gguf\n# edited by hand\n")
    code, _, err = export(cli, "--model", models["llama"], "--output_dir", out)
    assert code == 2 and "Modelfile exists and is not a file an earlier tunestack export wrote" in err


def test_a_failed_read_back_leaves_nothing(models, tmp_path, cli, monkeypatch) -> None:
    from tunestack.export import gguf_writer

    def corrupt_after_writing(path, *args, **kwargs):
        written = real_write(path, *args, **kwargs)
        with open(path, "r+b") as f:  # flip one byte in the last tensor's data
            f.seek(-1, 2)
            byte = f.read(1)
            f.seek(-1, 2)
            f.write(bytes([byte[0] ^ 0xFF]))
        return written

    real_write = gguf_writer.write_gguf
    monkeypatch.setattr(gguf_writer, "write_gguf", corrupt_after_writing)
    out = tmp_path / "gguf"
    code, _, err = export(cli, "--model", models["qwen2"], "--output_dir", out)
    assert code == 1
    assert "read-back check failed: tensor output.weight: its bytes differ from what was written" in err
    assert not out.exists()  # the folder it created is gone too


# ---------------------------------------------------------------------------------------------
# The real SmolLM2


@pytest.mark.slow
def test_smollm2_q8_0_answers_like_the_source(smollm2, tmp_path, cli) -> None:
    """The embedded SmolLM2-135M-Instruct through a q8_0 GGUF: the same greedy answer, the same token ids, and a
    Modelfile whose template (with SmolLM2's built-in default system prompt as SYSTEM) renders like ours."""
    from transformers import AutoTokenizer

    from tunestack.infer.generate import ChatModel, GenerationArguments, ModelSelection

    out = tmp_path / "gguf"
    code, stdout, err = export(cli, "--model", "smollm2-135m-instruct", "--quantization", "q8_0", "--output_dir", out)
    assert code == 0, err
    path = out / "smollm2-135m-instruct-q8_0.gguf"
    assert tensor_types(path)["token_embd.weight"] == "Q8_0"

    greedy = GenerationArguments(temperature=0, max_new_tokens=32)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    source = ChatModel.load(ModelSelection(model=str(smollm2), torch_dtype="float32"))
    expected = source.answer(question, greedy)
    assert "Paris" in expected
    back = ChatModel.load(ModelSelection(model=str(path), torch_dtype="float32"))  # transformers' GGUF reader
    assert back.answer(question, greedy) == expected

    ours = AutoTokenizer.from_pretrained(smollm2)
    read = AutoTokenizer.from_pretrained(out, gguf_file=path.name)
    assert read(MIXED_TEXT)["input_ids"] == ours(MIXED_TEXT)["input_ids"]

    modelfile = (out / "Modelfile").read_text()
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in modelfile
    if GO is not None:
        template = get_template(None, ours)
        assert go_render([(out / "Modelfile", TWO_TURNS)]) == [render_prompt(template, ours, TWO_TURNS)]
