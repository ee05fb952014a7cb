'use strict';
// airlock guest SDK for JavaScript: the sandbox's only channel to the
// platform. Node's standard library only; calls are synchronous.
// The channel is the socket at descriptor $AIRLOCK_BROKER_FD; frames are a
// 4-byte little-endian length followed by JSON (docs/broker-protocol.md).
//
//   const airlock = require('/opt/airlock/javascript/airlock.js');
//   const ax = airlock.connect();
//   ax.log.info('hello', { user: 42 });
//   const { value, found } = ax.secrets.get('DB_PASSWORD');
//   ax.agent.memory.put('counter', 1);
const fs = require('fs');

const MAX_FRAME = 1 << 20;

class AirlockError extends Error {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.name = 'AirlockError';
    this.code = code;
  }
}

class Channel {
  constructor(fd) {
    this.fd = fd;
    this.next = 1;
  }

  readExact(n) {
    const b = Buffer.alloc(n);
    let off = 0;
    while (off < n) {
      const r = fs.readSync(this.fd, b, off, n - off, null);
      if (r === 0) throw new AirlockError('closed', 'the broker closed the channel');
      off += r;
    }
    return b;
  }

  call(op, args, reservedId) {
    const id = reservedId === undefined ? this.next++ : reservedId;
    const body = Buffer.from(JSON.stringify({ v: 1, id, op, args: args || {} }));
    if (body.length > MAX_FRAME) throw new AirlockError('too_large', 'request exceeds the frame limit');
    const head = Buffer.alloc(4);
    head.writeUInt32LE(body.length, 0);
    const out = Buffer.concat([head, body]);
    let off = 0;
    while (off < out.length) off += fs.writeSync(this.fd, out, off, out.length - off);
    const n = this.readExact(4).readUInt32LE(0);
    if (n > MAX_FRAME) throw new AirlockError('protocol', 'oversized reply');
    const rep = JSON.parse(this.readExact(n).toString('utf8'));
    if (rep.id !== id) throw new AirlockError('protocol', 'reply does not match the request');
    if (!rep.ok) {
      const e = rep.error || {};
      throw new AirlockError(e.code || 'error', e.message || '');
    }
    return rep.result;
  }
}

function makeAx(ch, hello) {
  const log = {};
  for (const level of ['debug', 'info', 'warn', 'error']) {
    log[level] = (message, fields) => { ch.call('log', { level, message: String(message), fields: fields || {} }); };
  }
  const memory = {
    get: (key, dflt) => { const r = ch.call('memory.get', { key }); return r.found ? r.value : (dflt === undefined ? null : dflt); },
    getVersioned: (key) => { const r = ch.call('memory.get', { key }); return { value: r.value, version: r.version }; },
    put: (key, value) => ch.call('memory.put', { key, value }).version,
    cas: (key, expectedVersion, value) => {
      const r = ch.call('memory.cas', { key, expected_version: expectedVersion, value });
      return { ok: r.ok, version: r.version };
    },
    delete: (key) => ch.call('memory.delete', { key }).deleted,
    list: (prefix, limit) => ch.call('memory.list', { prefix: prefix || '', limit: limit || 100 }).keys.map((k) => k.key),
  };
  return {
    execution_id: hello.execution_id,
    tenant_id: hello.tenant_id,
    flow_id: hello.flow_id,
    trace_id: hello.trace_id,
    _variables: hello.variables === undefined ? null : hello.variables,
    // Config values and granted secrets (read when first needed).
    get variables() {
      if (this._variables === null) this._variables = ch.call('hello', {}).variables || {};
      return this._variables;
    },
    input: hello.input === undefined ? null : hello.input,
    _code: hello.code === undefined ? null : hello.code,
    _handler: !!hello.handler,
    log,
    secrets: {
      get: (name) => { const r = ch.call('secrets.get', { name }); return { value: r.value, found: r.found }; },
    },
    agent: { memory },
    _report: (res) => ch.call('result', res),
  };
}

let ax = null;

function connect(warm) {
  if (ax) return ax;
  const fd = process.env.AIRLOCK_BROKER_FD;
  if (fd === undefined) throw new AirlockError('unavailable', 'no broker channel in this sandbox');
  const ch = new Channel(Number(fd));
  // A warm runner's handshake uses the reserved id 0, so the program's own
  // requests start at 1 as they would in a cold sandbox.
  ax = makeAx(ch, warm ? ch.call('hello', {}, 0) : ch.call('hello', {}));
  return ax;
}

module.exports = { connect, AirlockError };
