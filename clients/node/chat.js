#!/usr/bin/env node
// The whole ragmesh flow from Node.js: uploads a file into ingest, follows it to READY
// (WatchDocument), searches it with the question, creates a session over it and streams
// the answer to the question (SendMessage) with its citations, printing each step.
//
//   node clients/node/chat.js FILE QUESTION [--host HOST] [--ingest HOST:PORT]
//                             [--sessions HOST:PORT] [--max-tokens N]
//
// Services are looked for on --host (default localhost) at their default ports (ingest
// 50051, sessions 50054); --ingest and --sessions move one. Set RAGMESH_API_KEY when the
// services have API keys configured. Exits 1 with the gRPC status on failure, 2 for a
// mistake in the command.
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const { once } = require("node:events");
const { parseArgs } = require("node:util");
const { connect, deadline, fail, metadata, unary } = require("./ragmesh");

const PROGRAM = "chat.js";
const USAGE =
  "usage: node clients/node/chat.js FILE QUESTION [--host HOST] [--ingest HOST:PORT] " +
  "[--sessions HOST:PORT] [--max-tokens N]";
// Bytes per upload message, well under the services' 16 MiB message limit.
const UPLOAD_PART_BYTES = 64 * 1024;
// Deadlines: processing a large PDF and generating an answer on a CPU both take minutes.
const UPLOAD_SECONDS = 300;
const PROCESSING_SECONDS = 600;
const ANSWER_SECONDS = 600;

function usage(message) {
  console.error(`${PROGRAM}: ${message}\n${USAGE}`);
  process.exit(2);
}

function parseCommand(argv) {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        host: { type: "string", default: "localhost" },
        ingest: { type: "string" },
        sessions: { type: "string" },
        "max-tokens": { type: "string" },
      },
    });
  } catch (error) {
    usage(error.message);
  }
  const { values, positionals } = parsed;
  if (positionals.length !== 2) {
    usage("expected FILE and QUESTION");
  }
  const [file, question] = positionals;
  let maxTokens;
  if (values["max-tokens"] !== undefined) {
    maxTokens = Number(values["max-tokens"]);
    if (!Number.isInteger(maxTokens) || maxTokens < 1) {
      usage(`--max-tokens ${values["max-tokens"]} is not a positive whole number`);
    }
  }
  let bytes;
  try {
    bytes = fs.readFileSync(file);
  } catch (error) {
    usage(`cannot read ${file}: ${error.message}`);
  }
  return {
    filename: path.basename(file),
    bytes,
    question,
    maxTokens,
    ingest: values.ingest || `${values.host}:50051`,
    sessions: values.sessions || `${values.host}:50054`,
  };
}

const short = (status) => status.replace(/^DOCUMENT_STATUS_/, "");
const quoted = (text, length = 70) => {
  const line = text.replace(/\s+/g, " ").trim();
  return JSON.stringify(line.length > length ? `${line.slice(0, length - 1)}…` : line);
};

// UploadDocument is a client stream: the metadata first, then the bytes in parts.
async function upload(ingest, filename, bytes) {
  let call;
  const response = new Promise((resolve, reject) => {
    call = ingest.UploadDocument(
      metadata(),
      { deadline: deadline(UPLOAD_SECONDS) },
      (error, reply) => (error ? reject(error) : resolve(reply)),
    );
  });
  call.write({ metadata: { filename } });
  for (let offset = 0; offset < bytes.length; offset += UPLOAD_PART_BYTES) {
    if (!call.write({ data: bytes.subarray(offset, offset + UPLOAD_PART_BYTES) })) {
      await Promise.race([once(call, "drain"), response]);
    }
  }
  call.end();
  return response;
}

// Follows the document through its processing states until the service ends the stream
// (READY or FAILED); prints each new state and returns the last document.
function watchUntilProcessed(ingest, documentId) {
  return new Promise((resolve, reject) => {
    const call = ingest.WatchDocument({ document_id: documentId }, metadata(), {
      deadline: deadline(PROCESSING_SECONDS),
    });
    let last;
    call.on("data", ({ document }) => {
      if (last === undefined || last.status !== document.status) {
        const chunks =
          document.status === "DOCUMENT_STATUS_READY" ? `, ${document.chunk_count} chunks` : "";
        console.log(`document ${document.id} ${short(document.status)}${chunks}`);
      }
      last = document;
    });
    call.on("error", reject);
    call.on("end", () => resolve(last));
  });
}

async function search(ingest, documentId, question) {
  const { hits } = await unary(ingest, "Search", {
    query: question,
    top_k: 3,
    filter: { document_ids: [documentId] },
  });
  console.log(`search ${quoted(question)}: ${hits.length} hits`);
  for (const hit of hits) {
    console.log(
      `  hit ${hit.score.toFixed(3)} ${hit.filename} chunk ${hit.chunk_index} ` +
        `document ${hit.document_id} ${quoted(hit.text)}`,
    );
  }
}

// Streams SendMessage's events as they come: the stored question, what was retrieved, the
// answer's deltas, then the stored answer with its citations.
function ask(sessions, sessionId, question, maxTokens) {
  const overrides = maxTokens === undefined ? {} : { max_new_tokens: maxTokens, temperature: 0 };
  return new Promise((resolve, reject) => {
    const call = sessions.SendMessage(
      { session_id: sessionId, content: question, overrides },
      metadata(),
      { deadline: deadline(ANSWER_SECONDS) },
    );
    let answer;
    call.on("data", (response) => {
      switch (response.event) {
        case "user_message":
          console.log(`question stored as message ${response.user_message.id}`);
          break;
        case "retrieval": {
          const { hits, skipped } = response.retrieval;
          const documents = hits.filter((hit) => hit.source === "SOURCE_DOCUMENT").length;
          console.log(
            `retrieval ${documents} passages, ${hits.length - documents} memories` +
              skipped.map((skip) => `; skipped ${skip.reason}: ${skip.message}`).join(""),
          );
          console.log("answer");
          break;
        }
        case "delta":
          process.stdout.write(response.delta);
          break;
        case "assistant_message":
          answer = response.assistant_message;
          break;
      }
    });
    call.on("error", reject);
    call.on("end", () => resolve(answer));
  });
}

function printAnswer(message) {
  process.stdout.write("\n");
  console.log(
    `finish ${message.finish_reason.replace(/^FINISH_REASON_/, "")} by ${message.model}: ` +
      `${message.prompt_tokens} prompt tokens, ${message.completion_tokens} completion tokens, ` +
      `first token after ${message.time_to_first_token_seconds.toFixed(2)} s`,
  );
  if (message.error) {
    console.log(`error ${message.error}`);
  }
  message.citations.forEach((citation, index) => {
    const page = citation.page ? ` page ${citation.page}` : "";
    console.log(
      `citation [D${index + 1}] ${citation.filename} document ${citation.document_id} ` +
        `chunk ${citation.chunk_id}${page} score ${citation.score.toFixed(3)}`,
    );
  });
}

async function main() {
  const command = parseCommand(process.argv.slice(2));
  const ingest = connect("ingest", "IngestService", command.ingest);
  const sessions = connect("sessions", "SessionsService", command.sessions);
  try {
    const { document, duplicate } = await upload(ingest, command.filename, command.bytes);
    console.log(
      `uploaded ${command.filename} (${command.bytes.length} bytes) as document ${document.id}` +
        (duplicate ? " (already stored: the same bytes)" : ""),
    );
    const processed = await watchUntilProcessed(ingest, document.id);
    if (processed.status !== "DOCUMENT_STATUS_READY") {
      throw new Error(`document ${document.id} is ${short(processed.status)}: ${processed.error}`);
    }
    await search(ingest, document.id, command.question);
    const { session } = await unary(sessions, "CreateSession", {
      name: `chat.js: ${command.filename}`,
      document_ids: [document.id],
    });
    console.log(`session ${session.id} over document ${document.id}`);
    const answer = await ask(sessions, session.id, command.question, command.maxTokens);
    printAnswer(answer);
  } finally {
    ingest.close();
    sessions.close();
  }
}

main().catch((error) => fail(PROGRAM, error));
