// What the Node.js clients share: stubs built at run time from protos/ with
// @grpc/proto-loader, the API key from RAGMESH_API_KEY, deadlines and error lines.
"use strict";

const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTOS = path.resolve(__dirname, "..", "..", "protos");

// The package ragmesh.<name>.v1 from protos/ragmesh/<name>/v1/<name>.proto.
function loadPackage(name) {
  const definition = protoLoader.loadSync(`ragmesh/${name}/v1/${name}.proto`, {
    includeDirs: [PROTOS],
    keepCase: true, // field names as in the .proto: document_id, usage_percent
    longs: String, // uint64 byte counts exceed JavaScript's safe integers
    enums: String, // DOCUMENT_STATUS_READY rather than 3
    defaults: true,
    oneofs: true, // a oneof's name says which field is set: event === "delta"
  });
  return grpc.loadPackageDefinition(definition).ragmesh[name].v1;
}

// A client of `service` in package `name` at target, without TLS (the mesh on loopback or
// behind Envoy).
function connect(name, service, target) {
  return new (loadPackage(name)[service])(target, grpc.credentials.createInsecure());
}

// The call's metadata: `authorization: Bearer $RAGMESH_API_KEY` when the key is set.
function metadata() {
  const result = new grpc.Metadata();
  if (process.env.RAGMESH_API_KEY) {
    result.set("authorization", `Bearer ${process.env.RAGMESH_API_KEY}`);
  }
  return result;
}

const deadline = (seconds) => new Date(Date.now() + seconds * 1000);

// Calls a unary method with the API key and a deadline, as a promise.
function unary(client, method, request, seconds = 30) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata(), { deadline: deadline(seconds) }, (error, response) =>
      error ? reject(error) : resolve(response),
    );
  });
}

// Prints "<program>: <STATUS>: <details>" (or the error's message when it is not a gRPC
// status) on stderr and exits 1.
function fail(program, error) {
  const code = typeof error.code === "number" ? `${grpc.status[error.code]}: ` : "";
  console.error(`${program}: ${code}${error.details || error.message}`);
  process.exit(1);
}

module.exports = { connect, deadline, fail, metadata, unary };
