// Starts `fleetgate sandbox --json --port 0 --admin-port 0 ...extraArgs` (FLEETGATE_BIN, default
// <repo>/target/debug/fleetgate) for the gateway tests: the sandbox upstream plus a gateway wired
// to it. Resolves to its JSON line (gateway_url, admin_url, admin_token, device_token, …) plus
// `ws_url` (the device URL with ws:// or wss://) and `proc`, to kill afterwards.

import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');

export async function startFleetgate(extraArgs = []) {
  const bin = process.env.FLEETGATE_BIN ?? path.join(REPO, 'target', 'debug', 'fleetgate');
  const proc = spawn(bin, ['sandbox', '--json', '--port', '0', '--admin-port', '0', ...extraArgs], {
    stdio: ['ignore', 'pipe', 'ignore'],
  });
  const rl = createInterface({ input: proc.stdout });
  const line = await new Promise((resolve, reject) => {
    rl.once('line', resolve);
    proc.once('error', reject);
    proc.once('exit', code => reject(new Error(`fleetgate sandbox exited: ${code}`)));
  });
  const info = JSON.parse(line);
  info.ws_url = info.gateway_url.replace(/^http/, 'ws');
  info.proc = proc;
  return info;
}
