"""The small chat page served at `/`: it streams answers from /v1/chat/completions with fetch and SSE parsing, at the
temperature and max tokens set on the page."""

CHAT_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>lmforge chat</title>
<style>
  body { font: 15px/1.4 system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; padding: 0 1rem; }
  #log div { white-space: pre-wrap; margin: .4rem 0; padding: .4rem .6rem; border-radius: .4rem; }
  .user { background: #e8f0fe; } .assistant { background: #f1f3f4; } .error { background: #fde8e8; }
  form { display: flex; gap: .5rem; } #prompt { flex: 1; padding: .4rem; }
  #settings { margin: .5rem 0; color: #555; font-size: 13px; } #settings input { width: 4.5rem; }
</style>
</head>
<body>
<h1>lmforge chat</h1>
<div id="log"></div>
<form id="form"><input id="prompt" autocomplete="off" placeholder="Type a message"><button>Send</button></form>
<div id="settings">
  <label>temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="0.8"></label>
  <label>max tokens <input id="max-tokens" type="number" min="1" step="1" value="128"></label>
</div>
<script>
const model = MODEL_NAME;
const messages = [];
const log = document.getElementById("log");
function bubble(role, text) {
  const div = document.createElement("div");
  div.className = role;
  div.textContent = text;
  log.appendChild(div);
  return div;
}
document.getElementById("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const input = document.getElementById("prompt");
  const content = input.value.trim();
  if (!content) return;
  input.value = "";
  messages.push({role: "user", content});
  bubble("user", content);
  const answer = bubble("assistant", "");
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify({
      model, messages, stream: true,
      temperature: Number(document.getElementById("temperature").value),
      max_tokens: Number(document.getElementById("max-tokens").value),
    }),
  });
  if (!response.ok) {
    answer.className = "error";
    answer.textContent = (await response.json()).error.message;
    return;
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    const events = buffer.split("\\n\\n");
    buffer = events.pop();
    for (const event of events) {
      const data = event.replace(/^data: /, "");
      if (data === "[DONE]") continue;
      const choice = JSON.parse(data).choices[0];
      if (choice && choice.delta.content) answer.textContent += choice.delta.content;
    }
  }
  answer.dataset.done = "true";
  messages.push({role: "assistant", content: answer.textContent});
});
</script>
</body>
</html>
"""
