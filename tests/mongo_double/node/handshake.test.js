'use strict';
// Handshake and topology: the Node.js driver discovers the server as the primary of a replica set,
// connects directly, negotiates zlib compression, and sends its client metadata.
const test = require('node:test');
const assert = require('node:assert/strict');
const { MongoClient } = require('./lib/driver');
const { connect, setup, failPoint } = require('./lib/helpers');
const line = require('./lib/line');

test('the driver under test', (t) => {
  const { version } = require(`${line.name}/package.json`);
  t.diagnostic(`${line.name} ${version}`);
  assert.equal(version.split('.')[0], line.major);
});

test('replica set discovery: the driver sees a primary', async (t) => {
  const { client } = await setup(t);
  const hello = await client.db('admin').command({ hello: 1 });
  assert.equal(hello.isWritablePrimary, true);
  assert.ok(hello.maxWireVersion >= 21, `maxWireVersion ${hello.maxWireVersion}`);
  assert.equal(typeof hello.logicalSessionTimeoutMinutes, 'number');
  assert.ok(hello.setName, 'a replica set member has a setName');
  assert.ok(hello.hosts.includes(hello.me), `${hello.me} not in ${hello.hosts}`);
  assert.equal(hello.primary, hello.me);
  const topology = client.topology.description;
  assert.equal(topology.type, 'ReplicaSetWithPrimary');
  assert.equal(topology.setName, hello.setName);
  const primaries = [...topology.servers.values()].filter((s) => s.type === 'RSPrimary');
  assert.deepEqual(primaries.map((s) => s.address), [hello.me]);
});

test('legacy isMaster answers ismaster: true', async (t) => {
  const { client } = await setup(t);
  const reply = await client.db('admin').command({ isMaster: 1 });
  assert.equal(reply.ismaster, true);
});

test('directConnection=true: a single server', async (t) => {
  const { client: rs, db } = await setup(t);
  const hello = await rs.db('admin').command({ hello: 1 });
  const direct = new MongoClient(`mongodb://${hello.me}/?directConnection=true`, {
    serverSelectionTimeoutMS: 10_000,
  });
  await direct.connect();
  t.after(() => direct.close());
  assert.equal(direct.topology.description.type, 'Single');
  const coll = direct.db(db.databaseName).collection('c');
  await coll.insertOne({ _id: 'direct' });
  assert.deepEqual(await coll.findOne({ _id: 'direct' }), { _id: 'direct' });
});

test('zlib compression: negotiated in the handshake, then requests and replies compressed', async (t) => {
  const { client, db } = await setup(t, { compressors: ['zlib'], monitorCommands: true });
  const replies = [];
  client.on('commandSucceeded', (e) => replies.push(e.commandName));
  const hello = await client.db('admin').command({ hello: 1, compression: ['snappy', 'zlib'] });
  assert.ok(hello.compression.includes('zlib'), `hello.compression: ${hello.compression}`);
  await db.collection('c').insertOne({ _id: 1, text: 'x'.repeat(100_000) });
  const doc = await db.collection('c').findOne({ _id: 1 });
  assert.equal(doc.text.length, 100_000);
  assert.deepEqual(replies, ['hello', 'insert', 'find']);
});

test('Stable API v1 (strict): the commands the driver sends are accepted', async (t) => {
  const { db } = await setup(t, { serverApi: { version: '1', strict: true, deprecationErrors: true } });
  await db.collection('c').insertMany([{ _id: 1 }, { _id: 2 }]);
  assert.deepEqual(await db.collection('c').find().sort({ _id: -1 }).toArray(), [{ _id: 2 }, { _id: 1 }]);
  assert.equal(await db.collection('c').countDocuments(), 2);
});

test('client metadata: the appName of the handshake reaches the server', async (t) => {
  const { client: admin } = await setup(t);
  const appName = `node-${process.pid}-${Date.now()}`;
  const ok = await failPoint(t, admin, 'failCommand', 'alwaysOn', {
    failCommands: ['ping'],
    errorCode: 8,
    appName,
  });
  if (!ok) return;
  const named = await connect({ appName });
  t.after(() => named.close());
  await assert.rejects(named.db('admin').command({ ping: 1 }), (err) => err.code === 8);
  await admin.db('admin').command({ ping: 1 }); // another appName: unaffected
});

test('the driver gossips $clusterTime and reads operationTime', async (t) => {
  const { client, db } = await setup(t, { monitorCommands: true });
  const sent = [];
  client.on('commandStarted', (e) => sent.push(e.command));
  const session = client.startSession({ causalConsistency: true });
  t.after(() => session.endSession());
  await db.collection('c').insertOne({ _id: 1 }, { session });
  assert.ok(session.operationTime, 'the session took operationTime from the reply');
  await db.collection('c').findOne({ _id: 1 }, { session });
  const find = sent.find((c) => c.find === 'c');
  assert.ok(find.$clusterTime, 'the driver sends $clusterTime back');
  assert.ok(find.readConcern.afterClusterTime.equals(session.operationTime));
});
