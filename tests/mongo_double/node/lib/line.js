'use strict';
// Which line of the Node.js driver the tests run: `mongodb` (7.x) unless NODE_MONGODB_PACKAGE names
// the alias of another line installed beside it (`mongodb6`, package.json: npm:mongodb@6).
const MAJORS = { mongodb: '7', mongodb6: '6' };
const name = process.env.NODE_MONGODB_PACKAGE || 'mongodb';
if (!(name in MAJORS)) {
  throw new Error(`NODE_MONGODB_PACKAGE=${name}: expected one of ${Object.keys(MAJORS).join(', ')}`);
}
module.exports = { name, major: MAJORS[name] };
