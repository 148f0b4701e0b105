'use strict';
// The Node.js driver module under test (see line.js).
module.exports = require(require('./line').name);
