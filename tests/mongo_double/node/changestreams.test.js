'use strict';
// Change streams through the Node.js driver: watch() with $match, resumeAfter, startAfter, and the
// driver's own resumption after a dropped connection or a resumable error during getMore.
const test = require('node:test');
const assert = require('node:assert/strict');
const { setup, nextEvent, takeEvents, started, failPoint } = require('./lib/helpers');

const AWAIT = { maxAwaitTimeMS: 200 };

async function assertNoEvent(stream) {
  // One tryNext() is one getMore waiting maxAwaitTimeMS: enough for an event already written.
  assert.equal(await stream.tryNext(), null);
}

test('watch() with a $match pipeline: only matching events, in order', async (t) => {
  const { db } = await setup(t);
  const c = db.collection('orders');
  const stream = await started(
    c.watch([{ $match: { operationType: 'insert', 'fullDocument.status': 'paid' } }], AWAIT),
  );
  t.after(() => stream.close());
  await c.insertMany([
    { _id: 1, status: 'paid' },
    { _id: 2, status: 'open' },
    { _id: 3, status: 'paid' },
  ]);
  await c.updateOne({ _id: 2 }, { $set: { status: 'paid' } }); // an update: filtered out
  await c.insertOne({ _id: 4, status: 'paid' });
  const events = await takeEvents(stream, 3);
  assert.deepEqual(events.map((e) => e.documentKey._id), [1, 3, 4]);
  for (const e of events) {
    assert.equal(e.operationType, 'insert');
    assert.deepEqual(e.ns, { db: db.databaseName, coll: 'orders' });
    assert.equal(e.fullDocument.status, 'paid');
  }
  await assertNoEvent(stream);
});

test('watch() on a database and with fullDocument updateLookup', async (t) => {
  const { db } = await setup(t);
  const stream = await started(db.watch([{ $match: { 'ns.coll': 'b' } }], { fullDocument: 'updateLookup', ...AWAIT }));
  t.after(() => stream.close());
  await db.collection('a').insertOne({ _id: 1 });
  await db.collection('b').insertOne({ _id: 1, n: 0 });
  await db.collection('b').updateOne({ _id: 1 }, { $inc: { n: 1 } });
  const [insert, update] = await takeEvents(stream, 2);
  assert.equal(insert.operationType, 'insert');
  assert.equal(update.operationType, 'update');
  assert.deepEqual(update.updateDescription.updatedFields, { n: 1 });
  assert.deepEqual(update.fullDocument, { _id: 1, n: 1 });
});

test('resumeAfter a token: the events after it, none before, none twice', async (t) => {
  const { db } = await setup(t);
  const c = db.collection('c');
  const first = await started(c.watch([], AWAIT));
  await c.insertMany([1, 2, 3, 4].map((i) => ({ _id: i })));
  const events = await takeEvents(first, 2);
  const token = events[1]._id;
  assert.deepEqual(first.resumeToken, token, 'the driver caches the last event token');
  await first.close();
  await c.insertOne({ _id: 5 });

  const resumed = c.watch([], { resumeAfter: token, ...AWAIT });
  t.after(() => resumed.close());
  const rest = await takeEvents(resumed, 3);
  assert.deepEqual(rest.map((e) => e.documentKey._id), [3, 4, 5]);
  await assertNoEvent(resumed);
});

test('startAfter a token, also after an invalidate', async (t) => {
  const { db } = await setup(t);
  const c = db.collection('c');
  const stream = await started(c.watch([], AWAIT));
  await c.insertMany([{ _id: 1 }, { _id: 2 }]);
  await c.drop();
  const events = await takeEvents(stream, 4);
  assert.deepEqual(events.map((e) => e.operationType), ['insert', 'insert', 'drop', 'invalidate']);
  await stream.close();

  const fromInsert = c.watch([], { startAfter: events[0]._id, ...AWAIT });
  t.after(() => fromInsert.close());
  const after = await takeEvents(fromInsert, 3);
  assert.deepEqual(after.map((e) => e.operationType), ['insert', 'drop', 'invalidate']);
  assert.equal(after[0].documentKey._id, 2);

  // resumeAfter cannot pass an invalidate; startAfter can (a new stream on the re-created collection).
  const invalidate = events[3]._id;
  const resume = c.watch([], { resumeAfter: invalidate, ...AWAIT });
  await assert.rejects(resume.tryNext(), (err) => err.code === 260);
  await resume.close();
  const restarted = c.watch([], { startAfter: invalidate, ...AWAIT });
  t.after(() => restarted.close());
  await c.insertOne({ _id: 'again' });
  const again = await nextEvent(restarted);
  assert.equal(again.operationType, 'insert');
  assert.equal(again.documentKey._id, 'again');
});

async function resumesWithoutLoss(t, db, configure) {
  const c = db.collection('c');
  const stream = await started(c.watch([], AWAIT));
  t.after(() => stream.close());
  await c.insertMany([0, 1, 2].map((i) => ({ _id: i })));
  const first = await takeEvents(stream, 3);
  if (!(await configure())) return false;
  await c.insertMany([3, 4, 5].map((i) => ({ _id: i })));
  const rest = await takeEvents(stream, 3);
  await assertNoEvent(stream);
  assert.deepEqual([...first, ...rest].map((e) => e.documentKey._id), [0, 1, 2, 3, 4, 5]);
  return true;
}

test('a connection dropped during getMore: the driver resumes, no event lost or doubled', async (t) => {
  const { client, db } = await setup(t, { monitorCommands: true });
  const aggregates = [];
  client.on('commandStarted', (e) => e.commandName === 'aggregate' && aggregates.push(e.command));
  const failedGetMores = [];
  client.on('commandFailed', (e) => e.commandName === 'getMore' && failedGetMores.push(e.failure));
  const configured = await resumesWithoutLoss(t, db, () =>
    failPoint(t, client, 'failCommand', { times: 1 }, { failCommands: ['getMore'], closeConnection: true }),
  );
  if (!configured) return;
  assert.equal(failedGetMores.length, 1, 'the fail point closed one getMore');
  assert.equal(failedGetMores[0].name, 'MongoNetworkError');
  assert.equal(aggregates.length, 2, 'the driver re-opened the stream once');
  const resumedWith = aggregates[1].pipeline[0].$changeStream;
  assert.ok(resumedWith.resumeAfter || resumedWith.startAfter, JSON.stringify(resumedWith));
});

test('a resumable error during getMore (server-labelled): the driver resumes', async (t) => {
  const { client, db } = await setup(t, { monitorCommands: true });
  const failures = [];
  client.on('commandFailed', (e) => e.commandName === 'getMore' && failures.push(e.failure));
  const configured = await resumesWithoutLoss(t, db, () =>
    failPoint(t, client, 'failGetMoreAfterCursorCheckout', { times: 1 }, { errorCode: 6 }),
  );
  if (!configured) return;
  assert.equal(failures.length, 1);
  assert.equal(failures[0].code, 6);
  assert.ok(failures[0].hasErrorLabel('ResumableChangeStreamError'));
});

test('CursorNotFound during getMore: the driver resumes', async (t) => {
  const { client, db } = await setup(t);
  await resumesWithoutLoss(t, db, () =>
    failPoint(t, client, 'failCommand', { times: 1 }, { failCommands: ['getMore'], errorCode: 43 }),
  );
});

test('a non-resumable error surfaces to the application', async (t) => {
  const { client, db } = await setup(t);
  const stream = await started(db.collection('c').watch([], AWAIT));
  t.after(() => stream.close());
  const ok = await failPoint(t, client, 'failCommand', { times: 1 }, {
    failCommands: ['getMore'],
    errorCode: 280,
    errorLabels: ['NonResumableChangeStreamError'],
  });
  if (!ok) return;
  await assert.rejects(stream.tryNext(), (err) => err.code === 280);
});
