'use strict';
// Transactions through session.withTransaction: atomic commit, abort, the driver's retries, and
// what a change stream sees of a committed transaction.
const test = require('node:test');
const assert = require('node:assert/strict');
const { MongoError } = require('./lib/driver');
const { setup, takeEvents, started, failPoint } = require('./lib/helpers');

const AWAIT = { maxAwaitTimeMS: 200 };

async function prepare(t, options = {}) {
  const ctx = await setup(t, options);
  // Collections exist before the transaction, as drivers' transaction tests do.
  await ctx.db.createCollection('accounts');
  await ctx.db.createCollection('ledger');
  const session = ctx.client.startSession();
  t.after(() => session.endSession());
  return { ...ctx, session };
}

test('withTransaction commits two writes atomically; the change stream shows them with lsid and txnNumber', async (t) => {
  const { client, db, session } = await prepare(t, { monitorCommands: true });
  const sent = [];
  client.on('commandStarted', (e) => sent.push(e.command));
  const stream = await started(db.watch([], AWAIT));
  t.after(() => stream.close());
  const accounts = db.collection('accounts');
  const ledger = db.collection('ledger');

  let seenOutside;
  await session.withTransaction(async () => {
    await accounts.insertOne({ _id: 'alice', balance: 100 }, { session });
    await ledger.insertOne({ _id: 1, account: 'alice', amount: 100 }, { session });
    // Not committed yet: invisible outside the transaction.
    seenOutside = await accounts.countDocuments({}) + (await ledger.countDocuments({}));
  });
  assert.equal(seenOutside, 0);
  assert.deepEqual(await accounts.find().toArray(), [{ _id: 'alice', balance: 100 }]);
  assert.deepEqual(await ledger.find().toArray(), [{ _id: 1, account: 'alice', amount: 100 }]);

  const inserts = sent.filter((c) => c.insert);
  assert.equal(inserts.length, 2);
  assert.equal(inserts[0].startTransaction, true);
  assert.equal(inserts[1].startTransaction, undefined);
  for (const c of inserts) assert.equal(c.autocommit, false);
  const commit = sent.find((c) => c.commitTransaction);
  assert.ok(commit, 'the driver committed');

  const events = await takeEvents(stream, 2);
  assert.deepEqual(events.map((e) => [e.ns.coll, e.documentKey._id]), [['accounts', 'alice'], ['ledger', 1]]);
  const txnNumber = Number(inserts[0].txnNumber);
  for (const e of events) {
    assert.equal(Number(e.txnNumber), txnNumber);
    assert.ok(e.lsid.id.buffer.equals(session.id.id.buffer), 'the event carries the session id');
    assert.ok(e.lsid.uid, 'lsid.uid');
  }
  assert.ok(events[0].clusterTime.equals(events[1].clusterTime), 'one commit, one clusterTime');
  assert.notDeepEqual(events[0]._id, events[1]._id);
});

test('a callback that throws aborts: nothing is written, no event', async (t) => {
  const { client, db, session } = await prepare(t, { monitorCommands: true });
  const names = [];
  client.on('commandStarted', (e) => names.push(e.commandName));
  const stream = await started(db.watch([], AWAIT));
  t.after(() => stream.close());
  await assert.rejects(
    session.withTransaction(async () => {
      await db.collection('accounts').insertOne({ _id: 'bob' }, { session });
      await db.collection('ledger').insertOne({ _id: 2 }, { session });
      throw new Error('business rule says no');
    }),
    /business rule says no/,
  );
  assert.ok(names.includes('abortTransaction'));
  assert.equal(await db.collection('accounts').countDocuments(), 0);
  assert.equal(await db.collection('ledger').countDocuments(), 0);
  assert.equal(await stream.tryNext(), null);
});

test('an explicit abortTransaction discards the writes', async (t) => {
  const { db, session } = await prepare(t);
  session.startTransaction();
  await db.collection('accounts').insertOne({ _id: 'carol' }, { session });
  assert.deepEqual(await db.collection('accounts').findOne({}, { session }), { _id: 'carol' });
  await session.abortTransaction();
  assert.equal(await db.collection('accounts').countDocuments(), 0);
});

test('a TransientTransactionError: withTransaction retries the whole callback once', async (t) => {
  const { client, db, session } = await prepare(t);
  const ok = await failPoint(t, client, 'failCommand', { times: 1 }, {
    failCommands: ['insert'],
    errorCode: 112,
    errorLabels: ['TransientTransactionError'],
  });
  if (!ok) return;
  let attempts = 0;
  await session.withTransaction(async () => {
    attempts += 1;
    await db.collection('accounts').insertOne({ _id: 'dave' }, { session });
    await db.collection('ledger').insertOne({ _id: 3 }, { session });
  });
  assert.equal(attempts, 2);
  assert.equal(await db.collection('accounts').countDocuments(), 1);
  assert.equal(await db.collection('ledger').countDocuments(), 1);
});

test('a connection dropped on commitTransaction: the driver retries the commit, applied once', async (t) => {
  const { client, db, session } = await prepare(t, { monitorCommands: true });
  const commits = [];
  client.on('commandStarted', (e) => e.commandName === 'commitTransaction' && commits.push(e.command));
  const ok = await failPoint(t, client, 'failCommand', { times: 1 }, {
    failCommands: ['commitTransaction'],
    closeConnection: true,
  });
  if (!ok) return;
  await session.withTransaction(async () => {
    await db.collection('accounts').insertOne({ _id: 'erin' }, { session });
  });
  assert.equal(commits.length, 2);
  assert.equal(commits[1].writeConcern.w, 'majority', 'a retried commit asks for w: majority');
  assert.deepEqual(await db.collection('accounts').find().toArray(), [{ _id: 'erin' }]);
});

test('a duplicate key inside a transaction aborts it', async (t) => {
  const { db, session } = await prepare(t);
  await db.collection('accounts').insertOne({ _id: 'frank' });
  await assert.rejects(
    session.withTransaction(async () => {
      await db.collection('ledger').insertOne({ _id: 4 }, { session });
      await db.collection('accounts').insertOne({ _id: 'frank' }, { session });
    }),
    (err) => err instanceof MongoError && err.code === 11000,
  );
  assert.equal(await db.collection('ledger').countDocuments(), 0);
});
