// A Stream subscriber for the benchmarks, in Node (@grpc/grpc-js): the `server_stream` and
// `subscribe` jobs of bench/load.py, with the same window and result, for a fraction of the CPU.
// A Python grpc.aio subscriber costs ~100 µs of CPU per message, so ten of them on a 2-core
// machine measured mostly themselves; this one costs ~25 µs.
//
//   node bench/subscriber.js '<job as JSON>'     -> prints the result as one JSON line
//
// Job: target, kind ("server_stream" | "subscribe"), method, request (hex), start_at (Unix s),
// warmup and duration (s); subscribe also mode ("count" | "record") and grace (s).
// Messages are never decoded, except that "record" reads change.report.message_id off the wire and a
// StreamBatches message is split into its changes.
'use strict';

const grpc = require('@grpc/grpc-js');

const job = JSON.parse(process.argv[2]);
const nowNs = () => Math.round((performance.timeOrigin + performance.now()) * 1e6);
const start = job.start_at * 1e9;
const end = start + job.duration * 1e9;
const begin = start - (job.warmup || 0) * 1e9;
const inside = (ns) => start <= ns && ns < end;
const after = (ns, callback) => setTimeout(callback, Math.max(0, (ns - nowNs()) / 1e6));

// Protobuf wire format, just enough to find a length-delimited field.
function varint(buffer, position) {
  let value = 0;
  let shift = 0;
  let byte;
  do {
    byte = buffer[position++];
    value += (byte & 0x7f) * 2 ** shift;
    shift += 7;
  } while (byte & 0x80);
  return [value, position];
}

// Yields [field number, bytes] for each length-delimited field of a message.
function* lengthDelimitedFields(buffer) {
  let position = 0;
  while (position < buffer.length) {
    let key;
    [key, position] = varint(buffer, position);
    const number = Math.floor(key / 8);
    const type = key & 7;
    if (type === 2) {
      let length;
      [length, position] = varint(buffer, position);
      yield [number, buffer.subarray(position, position + length)];
      position += length;
    } else if (type === 0) {
      [, position] = varint(buffer, position);
    } else if (type === 1) {
      position += 8;
    } else if (type === 5) {
      position += 4;
    } else {
      throw new Error(`unexpected wire type ${type}`);
    }
  }
}

function lengthDelimited(buffer, wanted) {
  for (const [number, value] of lengthDelimitedFields(buffer)) {
    if (number === wanted) return value;
  }
  return null;
}

// StreamBatchesResponse.responses = 1: the StreamResponses a StreamBatches message carries.
function responsesOf(batch) {
  const responses = [];
  for (const [number, value] of lengthDelimitedFields(batch)) {
    if (number === 1) responses.push(value);
  }
  return responses;
}

// StreamResponse.change = 5, StreamChange.report = 1, DeliveryReport.message_id = 2; a heartbeat
// has no change.
function messageId(response) {
  const change = lengthDelimited(response, 5);
  if (change === null) return null;
  const report = lengthDelimited(change, 1);
  const id = report === null ? null : lengthDelimited(report, 2);
  return id === null ? '' : id.toString('utf8');
}

const cpu = [];
after(start, () => cpu.push(process.cpuUsage()));
after(end, () => cpu.push(process.cpuUsage()));

const client = new grpc.Client(job.target, grpc.credentials.createInsecure(), {
  'grpc.max_receive_message_length': 64 * 1024 * 1024,
});
const identity = (bytes) => bytes;
const record = job.mode === 'record';
// StreamBatches carries several changes per message; `messages` counts changes either way.
const batched = job.method.endsWith('/StreamBatches');
const result = { messages: 0, grpc_messages: 0, errors: {} };
if (record) result.records = [];
let call = null;
let finished = false;

function finish() {
  if (finished) return;
  finished = true;
  if (call !== null) call.cancel();
  const last = cpu.length > 1 ? cpu[1] : process.cpuUsage();
  if (cpu.length > 0) {
    result.client_cpu_s = (last.user - cpu[0].user + last.system - cpu[0].system) / 1e6;
  }
  process.stdout.write(JSON.stringify(result) + '\n', () => process.exit(0));
}

function open() {
  call = client.makeServerStreamRequest(job.method, identity, identity, Buffer.from(job.request, 'hex'));
  let first = job.kind === 'subscribe'; // a subscription opens with a heartbeat: then it is live
  call.on('data', (message) => {
    const now = nowNs();
    if (first) {
      first = false;
      result.ready_at = now;
      result.late = now > begin;
      return;
    }
    const responses = batched ? responsesOf(message) : [message];
    if (record) {
      for (const response of responses) {
        const id = messageId(response);
        if (id !== null) result.records.push([id, now]);
      }
    }
    if (inside(now)) {
      result.messages += responses.length;
      result.grpc_messages += 1;
    }
  });
  call.on('error', (error) => {
    if (error.code !== grpc.status.CANCELLED) {
      const name = Object.keys(grpc.status).find((key) => grpc.status[key] === error.code) || 'UNKNOWN';
      result.errors[name] = (result.errors[name] || 0) + 1;
    }
    finish();
  });
  call.on('end', finish);
}

if (job.kind === 'server_stream') {
  after(begin, open);
  after(end, finish);
} else if (job.kind === 'subscribe') {
  open();
  after(end + (job.grace || 0) * 1e9, finish);
} else {
  throw new Error(`unknown job kind ${job.kind}`);
}
