#!/usr/bin/env node
// Prints the host status and the mesh's health from a ragmesh telemetry service.
//
//   node clients/node/telemetry.js [host:port]      (default localhost:50055)
//
// The stubs are built at run time from protos/ with @grpc/proto-loader. Set RAGMESH_API_KEY
// when the service has API keys configured. Exits 1 with the gRPC status on failure.
"use strict";

const { connect, fail, unary } = require("./ragmesh");

const GIB = 1024 ** 3;
const gib = (bytes) => `${(Number(bytes) / GIB).toFixed(1)} GiB`;
const seconds = (duration) => Number(duration.seconds) + duration.nanos / 1e9;

function formatUptime(duration) {
  const total = Math.floor(seconds(duration));
  const days = Math.floor(total / 86400);
  const hours = Math.floor((total % 86400) / 3600);
  const minutes = Math.floor((total % 3600) / 60);
  return `${days}d ${hours}h ${minutes}m`;
}

function printSystem(status) {
  const { cpu, memory, swap } = status;
  console.log(`host ${status.hostname}, up ${formatUptime(status.uptime)}`);
  console.log(
    `cpu ${cpu.usage_percent.toFixed(1)}% of ${cpu.logical_cores} cores, load ` +
      [cpu.load_average_1m, cpu.load_average_5m, cpu.load_average_15m]
        .map((load) => load.toFixed(2))
        .join(" "),
  );
  console.log(
    `memory ${gib(memory.used_bytes)} of ${gib(memory.total_bytes)} ` +
      `(${memory.used_percent.toFixed(1)}%)`,
  );
  console.log(`swap ${gib(swap.used_bytes)} of ${gib(swap.total_bytes)}`);
  for (const disk of status.disks) {
    console.log(
      `disk ${disk.mountpoint} ${gib(disk.used_bytes)} of ${gib(disk.total_bytes)} ` +
        `(${disk.used_percent.toFixed(1)}%)`,
    );
  }
  if (status.gpus.length === 0) {
    console.log(`gpus none: ${status.gpu_unavailable_reason}`);
  }
  for (const gpu of status.gpus) {
    console.log(
      `gpu ${gpu.index} ${gpu.name}: ${gpu.utilization_percent}% busy, ` +
        `${gib(gpu.memory_used_bytes)} of ${gib(gpu.memory_total_bytes)}, ` +
        `${gpu.temperature_celsius} °C`,
    );
  }
  for (const warning of status.warnings) {
    console.log(`warning ${warning.severity} ${warning.code}: ${warning.message}`);
  }
}

function printMesh(services) {
  console.log("mesh");
  for (const service of services) {
    const state = service.state.replace(/^STATE_/, "");
    const latency = service.latency ? `  ${(seconds(service.latency) * 1000).toFixed(1)} ms` : "";
    const error = service.error ? `  (${service.error})` : "";
    console.log(
      `  ${service.name.padEnd(10)} ${state.padEnd(12)} ${service.target}${latency}${error}`,
    );
  }
}

async function main() {
  const target = process.argv[2] || "localhost:50055";
  const client = connect("telemetry", "TelemetryService", target);
  try {
    const system = await unary(client, "GetSystemStatus", {}, 10);
    printSystem(system.status);
    const mesh = await unary(client, "GetMeshStatus", {}, 10);
    printMesh(mesh.services);
  } finally {
    client.close();
  }
}

main().catch((error) => fail("telemetry.js", error));
