#!/usr/bin/env node
// A small Node.js client for dlrhub, built from the .proto files alone
// (@grpc/grpc-js + @grpc/proto-loader, no generated code).
//
// As a module:
//   const { DlrhubClient } = require('./client/node/dlrhub-client');
//   const client = new DlrhubClient('127.0.0.1:50051');
//   const response = await client.ingest(jsonText, 'FORMAT_GMS');
//   const message = await client.getMessage({ message_id: 'm-1', include_history: true });
//   const page = await client.listMessages({ bulk_id: 'B-1', page_size: 100 });
//   const sub = client.stream({ heartbeat_interval: { seconds: 5 } }, (message) => console.log(message));
//   sub.cancel(); await sub.done;
//   client.close();
//
// A stream message is `{ cursor, change: { report, state } }` or `{ cursor, heartbeat: {} }`
// (`event` names which).
//
// As a script, `node client/node/dlrhub-client.js <host:port>` runs a demo:
// Stream, Ingest a GMS batch of two reports, GetMessage one of them, wait for both
// on the Stream. It prints one JSON object per line on stdout and exits non-zero
// on any error. Set DLRHUB_TOKEN to send `authorization: Bearer <token>`.
'use strict';

const crypto = require('node:crypto');
const path = require('node:path');

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'protos');
const SERVICE_PROTO = 'deliveryreport/v1/delivery_report_service.proto';
const LOADER_OPTIONS = Object.freeze({
  keepCase: true,
  longs: String,
  enums: String,
  defaults: false,
  oneofs: true,
  includeDirs: [PROTO_ROOT],
});
const DEFAULT_DEADLINE_MS = 10_000;
const DEMO_TIMEOUT_MS = 10_000;

let serviceConstructor = null;

/** The DeliveryReportService client constructor, loaded from protos/ (once). */
function loadService() {
  if (serviceConstructor === null) {
    const definition = protoLoader.loadSync(SERVICE_PROTO, LOADER_OPTIONS);
    const loaded = grpc.loadPackageDefinition(definition);
    serviceConstructor = loaded.deliveryreport.v1.DeliveryReportService;
  }
  return serviceConstructor;
}

class DlrhubClient {
  /**
   * @param {string} address host:port of dlrhub's gRPC listener.
   * @param {object} [options]
   * @param {string} [options.token] bearer token (default: env DLRHUB_TOKEN).
   * @param {number} [options.deadlineMs] deadline of unary calls.
   */
  constructor(address, { token = process.env.DLRHUB_TOKEN, deadlineMs = DEFAULT_DEADLINE_MS } = {}) {
    const Service = loadService();
    this.token = token || '';
    this.deadlineMs = deadlineMs;
    this.stub = new Service(address, grpc.credentials.createInsecure());
  }

  metadata() {
    const metadata = new grpc.Metadata();
    if (this.token) {
      metadata.set('authorization', `Bearer ${this.token}`);
    }
    return metadata;
  }

  unary(method, request) {
    return new Promise((resolve, reject) => {
      const options = { deadline: Date.now() + this.deadlineMs };
      this.stub[method](request, this.metadata(), options, (error, response) => {
        if (error) {
          reject(error);
        } else {
          resolve(response);
        }
      });
    });
  }

  /**
   * Ingest a provider's JSON body verbatim.
   * @param {string} payload the JSON text.
   * @param {string} [format] FORMAT_UNSPECIFIED (detect), FORMAT_GMS or FORMAT_SENT_SMS_REPORT.
   * @param {object} [options] { requestId } idempotency key; { view } INGEST_RESPONSE_VIEW_BASIC
   *   (the default: each item's outcome) or INGEST_RESPONSE_VIEW_FULL (and its report).
   * @returns {Promise<object>} the IngestResponse.
   */
  ingest(payload, format = 'FORMAT_UNSPECIFIED', options = {}) {
    const { requestId = '', view = 'INGEST_RESPONSE_VIEW_BASIC' } = options;
    return this.unary('Ingest', { payload, format, request_id: requestId, view });
  }

  /**
   * @param {object} request a GetMessageRequest, e.g. { message_id, include_history: true }.
   * @returns {Promise<object>} the GetMessageResponse; rejects with NOT_FOUND for an unknown id.
   */
  getMessage(request) {
    return this.unary('GetMessage', request);
  }

  /**
   * @param {object} request a ListMessagesRequest, e.g. { bulk_id, page_size, page_token }.
   * @returns {Promise<object>} the ListMessagesResponse (one page).
   */
  listMessages(request) {
    return this.unary('ListMessages', request);
  }

  /**
   * Follow the feed of changes (StreamBatches, or Stream on a server from
   * before it), calling onMessage(StreamResponse) for every change and
   * heartbeat, in cursor order.
   * @param {object} request a StreamRequest.
   * @param {function(object): void} onMessage
   * @returns {{call: object, cancel: function(): void, done: Promise<void>}} `done`
   *   resolves when the stream ends or is cancelled by `cancel()`, and rejects
   *   with the gRPC error otherwise.
   */
  stream(request, onMessage) {
    let cancelled = false;
    let call = null;
    const done = new Promise((resolve, reject) => {
      // StreamBatches: the same feed as Stream, several changes per message when they are ready;
      // Stream for a server from before StreamBatches (it answers UNIMPLEMENTED).
      const follow = (batched) => {
        const current = batched
          ? this.stub.StreamBatches({ stream: request }, this.metadata())
          : this.stub.Stream(request, this.metadata());
        call = current;
        current.on('data', (message) => {
          for (const response of batched ? message.responses : [message]) {
            if (cancelled) return; // nothing more after cancel(), as with one change per message
            onMessage(response);
          }
        });
        current.on('end', () => {
          if (call === current) resolve();
        });
        current.on('error', (error) => {
          if (call !== current) return;
          if (cancelled && error.code === grpc.status.CANCELLED) {
            resolve();
          } else if (batched && error.code === grpc.status.UNIMPLEMENTED) {
            follow(false);
          } else {
            reject(error);
          }
        });
      };
      follow(true);
    });
    return {
      get call() {
        return call;
      },
      done,
      cancel() {
        cancelled = true;
        call.cancel();
      },
    };
  }

  close() {
    this.stub.close();
  }
}

function timeout(ms, what) {
  let timer;
  const promise = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return { promise, clear: () => clearTimeout(timer) };
}

/** Wait for `promise`, failing after `ms` or as soon as `broken` rejects. */
async function waitFor(promise, broken, ms, what) {
  const timer = timeout(ms, what);
  try {
    return await Promise.race([promise, broken, timer.promise]);
  } finally {
    timer.clear();
  }
}

function emit(step, response) {
  const line = response === undefined ? { step } : { step, response };
  process.stdout.write(`${JSON.stringify(line)}\n`);
}

function gmsBatch(deliveredId, expiredId, reference) {
  const now = Date.now();
  return JSON.stringify([
    {
      number: '380961111111',
      time: now - 1000,
      status: 2,
      substatus: 23,
      hyber_status: 23011,
      message_id: deliveredId,
      extra_id: reference,
      sent_via: 'sms',
    },
    {
      number: '380962222222',
      time: now,
      status: 3,
      substatus: 35,
      hyber_status: 35015,
      message_id: expiredId,
      extra_id: reference,
      sent_via: 'sms',
    },
  ]);
}

async function demo(address) {
  const client = new DlrhubClient(address);
  const deliveredId = crypto.randomUUID();
  const expiredId = crypto.randomUUID();
  const ids = [deliveredId, expiredId];
  const reference = `node-demo-${crypto.randomUUID()}`;

  let opened;
  const streamOpen = new Promise((resolve) => {
    opened = resolve;
  });
  let allStreamed;
  const streamComplete = new Promise((resolve) => {
    allStreamed = resolve;
  });
  const streamed = [];
  // No start position: only changes stored after the call starts. The first
  // message (a heartbeat) shows the subscription is in place.
  const request = { message_ids: ids, heartbeat_interval: { seconds: 1 } };
  const subscription = client.stream(request, (message) => {
    opened(message);
    if (message.event !== 'change') {
      return;
    }
    streamed.push(message);
    const seen = new Set(streamed.map((m) => m.change.report.message_id));
    if (ids.every((id) => seen.has(id))) {
      allStreamed();
    }
  });
  const broken = subscription.done.then(() => {
    throw new Error('the stream ended before delivering both reports');
  });
  broken.catch(() => {}); // raced below; not an unhandled rejection once cancelled

  try {
    emit('stream_open', await waitFor(streamOpen, broken, DEMO_TIMEOUT_MS, 'the stream to open'));

    const ingested = await client.ingest(gmsBatch(deliveredId, expiredId, reference), 'FORMAT_GMS', {
      requestId: crypto.randomUUID(),
      view: 'INGEST_RESPONSE_VIEW_FULL',
    });
    emit('ingest', ingested);

    const fetched = await client.getMessage({ message_id: expiredId, include_history: true });
    emit('get_message', fetched);

    await waitFor(streamComplete, broken, DEMO_TIMEOUT_MS, 'both reports on the stream');
    for (const message of streamed) {
      emit('stream', message);
    }
    subscription.cancel();
    await subscription.done;
    emit('done');
  } finally {
    subscription.cancel();
    client.close();
  }
}

function describe(error) {
  if (error && typeof error.code === 'number' && error.details !== undefined) {
    const name = Object.keys(grpc.status).find((key) => grpc.status[key] === error.code) || error.code;
    return `gRPC ${name}: ${error.details}`;
  }
  return error && error.message ? error.message : String(error);
}

function main(argv) {
  const address = argv[2];
  if (!address || argv.length > 3) {
    process.stderr.write('usage: node client/node/dlrhub-client.js <host:port>\n');
    process.exitCode = 2;
    return;
  }
  demo(address).then(
    () => {
      process.exitCode = 0;
    },
    (error) => {
      process.stderr.write(`dlrhub-client: ${describe(error)}\n`);
      process.exit(1);
    },
  );
}

module.exports = { DlrhubClient, loadService, PROTO_ROOT, SERVICE_PROTO, LOADER_OPTIONS };

if (require.main === module) {
  main(process.argv);
}
