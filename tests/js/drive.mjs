// Drive gateway/static/client.js against a real gateway from Node (real WebSocket:
// node --experimental-websocket). Used by tests/test_client_js.py:
//   node --experimental-websocket tests/js/drive.mjs ws://127.0.0.1:PORT/ws
// It answers the demo agent's first question, prints "ready", waits for a line on stdin
// (meanwhile the test kills and restarts the gateway), answers the second question, and
// prints one JSON line with what it saw.
import { createInterface } from "node:readline";

import { HangonClient } from "../../gateway/static/client.js";

const url = process.argv[2];
const events = { restored: [], messages: [], reconnecting: [], acks: [] };
const client = new HangonClient(url, { user_id: "node", call_id: "drive" }, {
  storage: null,
  initialDelay: 100,
  maxDelay: 1000,
});
client.addEventListener("restored", (e) => events.restored.push(e.detail));
client.addEventListener("message", (e) => events.messages.push(e.detail.seq));
client.addEventListener("reconnecting", (e) => events.reconnecting.push(e.detail.code));
let done = false;
client.addEventListener("closed", (e) => {
  if (done) return;
  console.log(JSON.stringify({ closed: e.detail }));
  process.exit(1);
});

function until(predicate, what) {
  return new Promise((resolve, reject) => {
    const started = Date.now();
    const poll = setInterval(() => {
      if (predicate()) {
        clearInterval(poll);
        resolve();
      } else if (Date.now() - started > 15000) {
        clearInterval(poll);
        reject(new Error(`timed out waiting for ${what}`));
      }
    }, 10);
  });
}

client.start();
await until(() => events.messages.length >= 1, "the greeting");
events.acks.push(await client.turn({ turnId: "t1", text: "Ada" }));
await until(() => events.messages.length >= 2, "the second question");
console.log("ready");
const lines = createInterface({ input: process.stdin });
for await (const _ of lines) break;
// The gateway is gone now; this turn is sent once the client has reconnected by itself.
events.acks.push(await client.turn({ turnId: "t2", text: "Friday" }));
await until(() => events.messages.length >= 3, "the third question");
console.log(JSON.stringify({ ...events, state: client.state }));
done = true;
client.close();
process.exit(0);
