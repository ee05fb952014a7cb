'use strict';
// Runs a JavaScript execution inside the sandbox: a plain script, or a
// handler `function handler(ax, input)` exported as CommonJS
// (module.exports / exports.handler) or an ES module (export function
// handler / export default), whose JSON-serialisable result (or thrown
// error, with its stack) is reported to the broker.
const fs = require('fs');
const path = require('path');
const airlock = require(path.join(__dirname, 'airlock.js'));

function errorOf(e, type) {
  return {
    type: type || (e && e.name) || 'Error',
    message: String(e && e.message !== undefined ? e.message : e),
    traceback: (e && e.stack) || '',
  };
}

async function load(file) {
  try {
    return require(file);
  } catch (e) {
    if (!(e instanceof SyntaxError)) throw e;
    // ES module syntax: load it as one, from a copy in writable scratch.
    const esm = file.replace(/\.[cm]?js$/, '') + '.airlock.mjs';
    fs.copyFileSync(file, esm);
    return import(esm);
  }
}

async function main() {
  const file = process.argv[2];
  let ax = null;
  if (process.env.AIRLOCK_MODE === 'pooled') {
    // A warm sandbox: node and the SDK are loaded before any tenant exists.
    ax = airlock.connect(true); // blocks until an execution is bound
    fs.writeFileSync(file, ax._code || '');
    if (!ax._handler) {
      await load(file);
      return;
    }
  } else if (process.env.AIRLOCK_MODE !== 'handler') {
    await load(file);
    return;
  }
  ax = ax || airlock.connect();
  let fn;
  try {
    const mod = await load(file);
    fn = typeof mod === 'function' ? mod
      : (mod && typeof mod.handler === 'function') ? mod.handler
        : (mod && mod.default && typeof mod.default === 'function') ? mod.default
          : (mod && mod.default && typeof mod.default.handler === 'function') ? mod.default.handler
            : null;
    if (!fn) throw Object.assign(new Error('the code exports no function handler(ax, input)'), { name: 'HandlerMissing' });
  } catch (e) {
    ax._report({ error: errorOf(e, e && e.name === 'HandlerMissing' ? 'HandlerMissing' : 'LoadError') });
    process.exitCode = 1;
    return;
  }
  let out;
  try {
    out = await fn(ax, ax.input);
  } catch (e) {
    ax._report({ error: errorOf(e) });
    process.exitCode = 1;
    return;
  }
  try {
    JSON.stringify(out === undefined ? null : out);
  } catch (e) {
    ax._report({ error: errorOf(e, 'NotSerializable') });
    process.exitCode = 1;
    return;
  }
  ax._report({ output: out === undefined ? null : out });
}

main().catch((e) => {
  process.stderr.write(String((e && e.stack) || e) + '\n');
  process.exitCode = 1;
});
