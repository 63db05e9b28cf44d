// The tunestack chat page: talks to this server's /v1 API, streams answers (server-sent events).
"use strict";

const TEXT = {
  en: { model: "Model", temperature: "Temperature", max_tokens: "Max tokens", api_key: "API key",
    system: "System prompt", system_hint: "Empty: the system prompt the model was trained with",
    question: "Ask something… (Enter sends, Shift+Enter for a new line)", send: "Send", stop: "Stop",
    clear: "New chat", stopped: "stopped", error: "error", rate: (n, s, r) => `${n} tokens in ${s} s · ${r} tokens/s`,
    lang: "中文" },
  zh: { model: "模型", temperature: "温度", max_tokens: "最大长度", api_key: "API 密钥",
    system: "系统提示词", system_hint: "留空：使用模型训练时的系统提示词",
    question: "输入问题…（回车发送，Shift+回车换行）", send: "发送", stop: "停止",
    clear: "新对话", stopped: "已停止", error: "错误", rate: (n, s, r) => `${n} 个 token，${s} 秒 · ${r} token/秒`,
    lang: "English" },
};
let lang = localStorage.getItem("tunestack.lang") || (navigator.language.startsWith("zh") ? "zh" : "en");
const $ = (id) => document.getElementById(id);
const history = [];
let controller = null;

function t(key) { return TEXT[lang][key]; }

function applyLanguage() {
  document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
  document.querySelectorAll("[data-i18n]").forEach((el) => { el.textContent = t(el.dataset.i18n); });
  document.querySelectorAll("[data-i18n-placeholder]").forEach((el) => { el.placeholder = t(el.dataset.i18nPlaceholder); });
  $("lang").textContent = t("lang");
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  $("log").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function loadModels() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    if (!r.ok) throw new Error((await r.json()).error.message);
    const select = $("model");
    const chosen = select.value;
    select.innerHTML = "";
    for (const m of (await r.json()).data) select.add(new Option(m.id, m.id));
    if (chosen) select.value = chosen;
    $("status").textContent = "";
  } catch (e) { $("status").textContent = `${t("error")}: ${e.message}`; }
}

async function ask(question) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history, { role: "user", content: question });
  const body = { model: $("model").value, messages, stream: true, stream_options: { include_usage: true } };
  const temperature = $("temperature").value;
  if (temperature !== "") body.temperature = Number(temperature);
  if ($("max_tokens").value) body.max_tokens = Number($("max_tokens").value);
  bubble("user", question);
  const out = bubble("assistant", "");
  controller = new AbortController();
  $("stop").disabled = false; $("send").disabled = true;
  const started = performance.now();
  let first = null, tokens = 0, answer = "", finished = false;
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body),
      signal: controller.signal });
    if (!r.ok) throw new Error((await r.json()).error.message);
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end); buffer = buffer.slice(end + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") { finished = true; continue; }
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) tokens = chunk.usage.completion_tokens;
        for (const choice of chunk.choices || []) {
          const piece = choice.delta && choice.delta.content;
          if (piece) { if (first === null) first = performance.now(); answer += piece; out.textContent = answer; }
        }
      }
    }
    history.push({ role: "user", content: question }, { role: "assistant", content: answer });
  } catch (e) {
    if (e.name === "AbortError") { out.textContent = `${answer} [${t("stopped")}]`; }
    else { out.className = "msg assistant error"; out.textContent = `${t("error")}: ${e.message}`; }
  } finally {
    controller = null;
    $("stop").disabled = true; $("send").disabled = false;
    const seconds = (performance.now() - started) / 1000;
    const decoding = first === null ? 0 : (performance.now() - first) / 1000;
    if (finished) $("status").textContent = t("rate")(tokens, seconds.toFixed(2), decoding > 0 ? (Math.max(tokens - 1, 0) / decoding).toFixed(1) : "-");
    out.dataset.done = finished ? "true" : "false";
  }
}

$("ask").addEventListener("submit", (e) => {
  e.preventDefault();
  const question = $("question").value.trim();
  if (!question || controller) return;
  $("question").value = "";
  ask(question);
});
$("question").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("ask").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("clear").addEventListener("click", () => { history.length = 0; $("log").innerHTML = ""; $("status").textContent = ""; });
$("lang").addEventListener("click", () => { lang = lang === "en" ? "zh" : "en"; localStorage.setItem("tunestack.lang", lang); applyLanguage(); });
$("api_key").addEventListener("change", () => { sessionStorage.setItem("tunestack.key", $("api_key").value); loadModels(); });
$("api_key").value = sessionStorage.getItem("tunestack.key") || "";
applyLanguage();
loadModels();
