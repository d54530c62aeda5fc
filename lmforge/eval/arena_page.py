"""The arena page served at `/`: a prompt, two anonymous answers, three vote buttons, the models revealed after the
vote, and the leaderboard, all through the JSON API of eval/arena.py."""

ARENA_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>lmforge arena</title>
<style>
  body { font: 15px/1.4 system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; }
  #prompt { white-space: pre-wrap; background: #e8f0fe; padding: .5rem .7rem; border-radius: .4rem; }
  #answers { display: flex; gap: 1rem; margin: 1rem 0; } .answer { flex: 1; }
  .answer pre { white-space: pre-wrap; background: #f1f3f4; padding: .5rem .7rem; border-radius: .4rem;
                min-height: 4rem; font: inherit; }
  #votes { display: flex; gap: .5rem; } #status { color: #555; margin: .5rem 0; } .error { color: #b00020; }
  table { border-collapse: collapse; margin-top: 1rem; } td, th { padding: .2rem .6rem; text-align: right; }
  td:first-child, th:first-child { text-align: left; }
</style>
</head>
<body>
<h1>lmforge arena</h1>
<p>Which answer is better? The models are named after you vote.</p>
<div id="prompt"></div>
<div id="answers">
  <div class="answer"><h3>A <span id="name-a"></span></h3><pre id="answer-a"></pre></div>
  <div class="answer"><h3>B <span id="name-b"></span></h3><pre id="answer-b"></pre></div>
</div>
<div id="votes">
  <button id="vote-a" data-choice="A" disabled>A is better</button>
  <button id="vote-tie" data-choice="tie" disabled>Tie</button>
  <button id="vote-b" data-choice="B" disabled>B is better</button>
  <button id="next" disabled>Next pair</button>
</div>
<div id="status"></div>
<h2>Leaderboard <small id="total"></small></h2>
<table>
  <thead><tr><th>model</th><th>Bradley-Terry</th><th>95% interval</th><th>Elo</th><th>votes</th>
  <th>wins</th><th>losses</th><th>ties</th></tr></thead>
  <tbody id="leaderboard"></tbody>
</table>
<script>
const $ = (id) => document.getElementById(id);
const buttons = ["vote-a", "vote-tie", "vote-b"].map($);
let pairId = null;
function status(text, error) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}
async function call(path, body) {
  const init = body ? {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)}
                    : {method: path === "/api/pair" ? "POST" : "GET"};
  const response = await fetch(path, init);
  const data = await response.json();
  if (!response.ok) throw new Error(typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail));
  return data;
}
function showBoard(board) {
  $("total").textContent = `(${board.votes} votes)`;
  $("total").dataset.votes = board.votes;
  const body = $("leaderboard");
  body.replaceChildren();
  for (const row of board.models) {
    const tr = document.createElement("tr");
    tr.dataset.model = row.model;
    const cells = [row.model, row.bt.toFixed(1), `${row.bt_low.toFixed(1)} to ${row.bt_high.toFixed(1)}`,
                   row.elo.toFixed(1), row.votes, row.wins, row.losses, row.ties];
    for (const value of cells) {
      const td = document.createElement("td");
      td.textContent = value;
      tr.appendChild(td);
    }
    body.appendChild(tr);
  }
}
async function nextPair() {
  pairId = null;
  $("next").disabled = true;
  for (const id of ["prompt", "answer-a", "answer-b", "name-a", "name-b"]) $(id).textContent = "";
  delete $("answers").dataset.pair;
  status("generating answers...");
  try {
    const pair = await call("/api/pair");
    $("prompt").textContent = pair.prompt;
    $("answer-a").textContent = pair.a;
    $("answer-b").textContent = pair.b;
    pairId = pair.pair_id;
    $("answers").dataset.pair = pairId;
    buttons.forEach((b) => { b.disabled = false; });
    status("");
  } catch (e) {
    status(e.message, true);
    $("next").disabled = false;
  }
}
for (const button of buttons) {
  button.addEventListener("click", async () => {
    buttons.forEach((b) => { b.disabled = true; });
    try {
      const result = await call("/api/vote", {pair_id: pairId, choice: button.dataset.choice});
      $("name-a").textContent = `(${result.a})`;
      $("name-b").textContent = `(${result.b})`;
      showBoard(result.leaderboard);
      status(`vote recorded: ${button.dataset.choice}`);
      $("answers").dataset.voted = pairId;
    } catch (e) {
      status(e.message, true);
    }
    $("next").disabled = false;
  });
}
$("next").addEventListener("click", nextPair);
call("/api/leaderboard").then(showBoard).catch((e) => status(e.message, true));
nextPair();
</script>
</body>
</html>
"""
