'use strict';
// Mongoose (which brings its own copy of the Node.js driver): a model's save, queries, a watch() on
// the model, and a transaction through connection.transaction().
const test = require('node:test');
const assert = require('node:assert/strict');
const mongoose = require('mongoose');
const { uri, dbName } = require('./lib/helpers');

async function waitFor(predicate, timeoutMs = 10_000) {
  const deadline = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`not within ${timeoutMs} ms`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

async function connection(t, options = {}) {
  const conn = mongoose.createConnection(uri(), {
    dbName: dbName(),
    serverSelectionTimeoutMS: 10_000,
    autoIndex: false,
    ...options,
  });
  await conn.asPromise();
  t.after(async () => {
    await conn.dropDatabase().catch(() => {});
    await conn.close();
  });
  return conn;
}

const userSchema = new mongoose.Schema({
  name: { type: String, required: true },
  email: { type: String, required: true },
  visits: { type: Number, default: 0 },
});

test('a model save, then find, update and validation', async (t) => {
  const conn = await connection(t);
  const User = conn.model('User', userSchema);
  const ada = await new User({ name: 'Ada', email: 'ada@example.org' }).save();
  assert.ok(ada._id instanceof mongoose.Types.ObjectId);
  const found = await User.findById(ada._id).lean();
  assert.deepEqual(Object.keys(found), ['_id', 'name', 'email', 'visits', '__v']);
  assert.equal(found.name, 'Ada');
  ada.visits += 1;
  await ada.save();
  assert.equal((await User.findOne({ email: 'ada@example.org' })).visits, 1);
  await assert.rejects(new User({ name: 'no email' }).save(), mongoose.Error.ValidationError);
  assert.equal(await User.countDocuments(), 1);
});

test('Model.watch(): the model\'s inserts and updates, filtered by $match', async (t) => {
  const conn = await connection(t, { monitorCommands: true });
  const User = conn.model('User', userSchema);
  await User.createCollection();
  const opened = new Promise((resolve) => {
    conn.getClient().on('commandSucceeded', (e) => e.commandName === 'aggregate' && resolve());
  });
  const stream = User.watch([{ $match: { operationType: { $in: ['insert', 'update'] } } }], {
    fullDocument: 'updateLookup',
    maxAwaitTimeMS: 200,
  });
  t.after(() => stream.close());
  const events = [];
  stream.on('change', (e) => events.push(e));
  const failed = new Promise((_, reject) => stream.on('error', reject));
  await Promise.race([opened, failed]); // the stream is open on the server: later writes are seen
  const grace = await new User({ name: 'Grace', email: 'grace@example.org' }).save();
  await User.updateOne({ _id: grace._id }, { $inc: { visits: 5 } });
  await User.deleteOne({ _id: grace._id }); // filtered out
  await User.create({ name: 'Hedy', email: 'hedy@example.org' });
  await Promise.race([waitFor(() => events.length >= 3), failed]);
  const [insert, update, second] = events;
  assert.equal(insert.operationType, 'insert');
  assert.equal(insert.fullDocument.name, 'Grace');
  assert.ok(insert.documentKey._id.equals(grace._id));
  assert.equal(update.operationType, 'update');
  assert.deepEqual(update.updateDescription.updatedFields, { visits: 5 });
  // updateLookup reads the document when the event is returned: null if the delete came first, else
  // the updated document (an open getMore can return the update before the delete runs).
  assert.ok(
    update.fullDocument === null || update.fullDocument.visits === 5,
    `updateLookup: null or the updated document, got ${JSON.stringify(update.fullDocument)}`,
  );
  assert.equal(second.fullDocument.name, 'Hedy');
  await new Promise((resolve) => setTimeout(resolve, 300));
  assert.equal(events.length, 3, 'no event twice, the delete filtered out');
});

test('connection.transaction(): both saves or neither', async (t) => {
  const conn = await connection(t);
  const User = conn.model('User', userSchema);
  await User.createCollection();
  await conn.transaction(async (session) => {
    await User.create([{ name: 'A', email: 'a@example.org' }], { session });
    await User.create([{ name: 'B', email: 'b@example.org' }], { session });
  });
  assert.deepEqual((await User.find().sort({ name: 1 }).lean()).map((u) => u.name), ['A', 'B']);
  await assert.rejects(
    conn.transaction(async (session) => {
      await User.create([{ name: 'C', email: 'c@example.org' }], { session });
      throw new Error('rolled back');
    }),
    /rolled back/,
  );
  assert.equal(await User.countDocuments(), 2);
});
