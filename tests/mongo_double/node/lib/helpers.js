'use strict';
// Shared by the conformance tests: the server under test comes from MONGODB_URI (the pytest wrapper
// tests/mongo_double/test_node_driver.py sets it to a fresh MongoDB test server, or passes on a real
// MongoDB 7.0 replica set's URI), and every test works in a database of its own.
const crypto = require('node:crypto');
const { MongoClient, MongoServerError } = require('./driver');

const EVENT_TIMEOUT_MS = 10_000;

function uri() {
  const value = process.env.MONGODB_URI;
  if (!value) {
    throw new Error('MONGODB_URI is not set: run these tests through tests/mongo_double/test_node_driver.py');
  }
  return value;
}

function dbName() {
  return `test_${crypto.randomBytes(6).toString('hex')}`;
}

async function connect(options = {}) {
  const client = new MongoClient(uri(), { serverSelectionTimeoutMS: 10_000, ...options });
  await client.connect();
  return client;
}

// A connected client and a database of this test's own, dropped (and the client closed) after it.
async function setup(t, options = {}) {
  const client = await connect(options);
  const db = client.db(dbName());
  t.after(async () => {
    await db.dropDatabase().catch(() => {});
    await client.close();
  });
  return { client, db };
}

// The next change event, or an error after `timeoutMs` (a test never hangs on a stream).
async function nextEvent(stream, timeoutMs = EVENT_TIMEOUT_MS) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const event = await stream.tryNext();
    if (event !== null) return event;
  }
  throw new Error(`no change event within ${timeoutMs} ms`);
}

async function takeEvents(stream, n, timeoutMs = EVENT_TIMEOUT_MS) {
  const events = [];
  while (events.length < n) events.push(await nextEvent(stream, timeoutMs));
  return events;
}

// The driver opens a change stream lazily: one tryNext() sends the aggregate, so writes made after
// it are seen (it returns null: nothing has happened yet).
async function started(stream) {
  const first = await stream.tryNext();
  if (first !== null) throw new Error(`a fresh change stream returned an event: ${JSON.stringify(first)}`);
  return stream;
}

// configureFailPoint on admin; skips the test (with the reason) on a server without test commands,
// and switches the fail point off after the test.
async function failPoint(t, client, name, mode, data = {}) {
  try {
    await client.db('admin').command({ configureFailPoint: name, mode, data });
  } catch (err) {
    if (err instanceof MongoServerError && (err.code === 59 || err.codeName === 'CommandNotFound')) {
      t.skip('the server has no configureFailPoint (start mongod with enableTestCommands=1)');
      return false;
    }
    throw err;
  }
  t.after(() => client.db('admin').command({ configureFailPoint: name, mode: 'off' }).catch(() => {}));
  return true;
}

module.exports = { uri, dbName, connect, setup, nextEvent, takeEvents, started, failPoint };
