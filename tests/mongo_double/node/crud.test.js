'use strict';
// CRUD as the Node.js driver sends it: documents built by the driver, _id order, cursors.
const test = require('node:test');
const assert = require('node:assert/strict');
const { ObjectId } = require('./lib/driver');
const { setup } = require('./lib/helpers');

// MongoDB documents that "the _id field is always the first field in the documents. If the server
// receives a document that does not have the _id field first, then the server will move the field
// to the beginning." The Node.js driver adds a missing _id as the document's last field.
test('insertOne: the driver puts a generated _id last, the server stores it first', async (t) => {
  const { client, db } = await setup(t, { monitorCommands: true });
  const sent = [];
  client.on('commandStarted', (e) => e.commandName === 'insert' && sent.push(e.command.documents[0]));
  const doc = { name: 'ada', age: 36 };
  const { insertedId } = await db.collection('people').insertOne(doc);
  assert.ok(insertedId instanceof ObjectId);
  assert.deepEqual(Object.keys(sent[0]), ['name', 'age', '_id'], 'premise: the driver appends _id');
  const found = await db.collection('people').findOne({ _id: insertedId });
  assert.deepEqual(Object.keys(found), ['_id', 'name', 'age']);
});

test('insertMany / replaceOne: a client-given _id in the middle is moved first', async (t) => {
  const { db } = await setup(t);
  await db.collection('c').insertMany([{ a: 1, _id: 1, b: 2 }, { a: 1 }]);
  const docs = await db.collection('c').find().toArray();
  for (const doc of docs) assert.equal(Object.keys(doc)[0], '_id', JSON.stringify(doc));
  await db.collection('c').replaceOne({ _id: 1 }, { z: 1, _id: 1 });
  assert.deepEqual(Object.keys(await db.collection('c').findOne({ _id: 1 })), ['_id', 'z']);
});

test('find iterates getMore batches in order, and an early close kills the cursor', async (t) => {
  const { client, db } = await setup(t, { monitorCommands: true });
  await db.collection('c').insertMany(Array.from({ length: 10 }, (_, i) => ({ _id: i })));
  const seen = [];
  client.on('commandSucceeded', (e) => seen.push({ name: e.commandName, reply: e.reply }));
  const all = await db.collection('c').find({}, { batchSize: 3 }).sort({ _id: 1 }).toArray();
  assert.deepEqual(all.map((d) => d._id), [...Array(10).keys()]);
  assert.equal(seen.filter((e) => e.name === 'getMore').length, 3);

  seen.length = 0;
  const cursor = db.collection('c').find({}, { batchSize: 2 });
  assert.deepEqual(await cursor.next(), { _id: 0 });
  await cursor.close();
  const kill = seen.find((e) => e.name === 'killCursors');
  assert.ok(kill, 'closing an open cursor sends killCursors');
  assert.equal(kill.reply.cursorsKilled.length, 1);
});

test('updates, upserts, deletes and findOneAndUpdate report what they did', async (t) => {
  const { db } = await setup(t);
  const c = db.collection('c');
  await c.insertMany([{ _id: 1, n: 1 }, { _id: 2, n: 2 }]);
  const up = await c.updateMany({}, { $inc: { n: 10 } });
  assert.equal(up.matchedCount, 2);
  assert.equal(up.modifiedCount, 2);
  const upsert = await c.updateOne({ _id: 3 }, { $set: { n: 3 } }, { upsert: true });
  assert.equal(upsert.upsertedId, 3);
  const after = await c.findOneAndUpdate({ _id: 1 }, { $set: { n: 0 } }, { returnDocument: 'after' });
  assert.deepEqual(after, { _id: 1, n: 0 });
  const del = await c.deleteMany({ n: { $gte: 3 } });
  assert.equal(del.deletedCount, 2);
  assert.deepEqual(await c.find().toArray(), [{ _id: 1, n: 0 }]);
  await assert.rejects(c.insertOne({ _id: 1 }), (err) => err.code === 11000);
});
