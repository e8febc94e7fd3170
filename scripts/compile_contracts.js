#!/usr/bin/env node
// Compile every Solidity source under contracts/ with solc-js (npm `solc`, pinned
// in package.json; offline: the compiler is bundled wasm) and write one JSON
// artifact per contract to contracts/build/:
//   { contractName, sourceName, compiler, settings, sources: {path: sha256},
//     abi, bytecode, deployedBytecode }
// `sources` lists every source of the compilation with its sha256, so Python can
// tell stale artifacts without Node (fi_peer/chain/artifacts.py).
//
// Usage: node scripts/compile_contracts.js [--check] [--out DIR]
//   --check   compile in memory and compare with the committed artifacts;
//             exit 1 (listing the differences) if any is missing, extra or stale.
//   --out DIR write the artifacts to DIR instead of contracts/build.
"use strict";

const crypto = require("crypto");
const fs = require("fs");
const path = require("path");
const solc = require("solc");

const ROOT = path.resolve(__dirname, "..");
const CONTRACTS = path.join(ROOT, "contracts");
const BUILD = path.join(CONTRACTS, "build");

// Keep in sync with SETTINGS in fi_peer/chain/artifacts.py (checked by a test).
const SETTINGS = {
  optimizer: { enabled: true, runs: 1000 },
  viaIR: true,
  evmVersion: "cancun",
  metadata: { bytecodeHash: "ipfs" },
};

function parseArgs(argv) {
  const args = { check: false, out: BUILD };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--check") args.check = true;
    else if (argv[i] === "--out") args.out = path.resolve(argv[++i]);
    else throw new Error(`unknown argument: ${argv[i]}`);
  }
  return args;
}

// Every .sol file under contracts/ except build/, as POSIX paths relative to the repo root.
function findSources(dir) {
  const found = [];
  for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
    const full = path.join(dir, entry.name);
    if (entry.isDirectory()) {
      if (full !== BUILD) found.push(...findSources(full));
    } else if (entry.name.endsWith(".sol")) {
      found.push(path.relative(ROOT, full).split(path.sep).join("/"));
    }
  }
  return found.sort();
}

function sha256(text) {
  return crypto.createHash("sha256").update(text, "utf8").digest("hex");
}

function compile() {
  const names = findSources(CONTRACTS);
  if (names.length === 0) throw new Error("no Solidity sources under contracts/");
  const sources = {};
  const hashes = {};
  for (const name of names) {
    const content = fs.readFileSync(path.join(ROOT, name), "utf8");
    sources[name] = { content };
    hashes[name] = sha256(content);
  }
  const input = {
    language: "Solidity",
    sources,
    settings: {
      ...SETTINGS,
      outputSelection: {
        "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"] },
      },
    },
  };
  // Imports resolve only to files of this repository (paths relative to its root).
  const findImports = (p) => {
    const full = path.resolve(ROOT, p);
    if (!full.startsWith(CONTRACTS + path.sep) || !fs.existsSync(full)) {
      return { error: `import not found under contracts/: ${p}` };
    }
    return { contents: fs.readFileSync(full, "utf8") };
  };
  const output = JSON.parse(solc.compile(JSON.stringify(input), { import: findImports }));
  const problems = output.errors || [];
  for (const p of problems) {
    if (p.severity !== "error") process.stderr.write(p.formattedMessage + "\n");
  }
  const errors = problems.filter((p) => p.severity === "error");
  if (errors.length) {
    throw new Error(errors.map((e) => e.formattedMessage).join("\n"));
  }
  const artifacts = {};
  for (const sourceName of Object.keys(output.contracts).sort()) {
    for (const [contractName, c] of Object.entries(output.contracts[sourceName])) {
      if (artifacts[contractName]) throw new Error(`duplicate contract name ${contractName}`);
      const artifact = {
        contractName,
        sourceName,
        compiler: solc.version(),
        settings: SETTINGS,
        sources: hashes,
        abi: c.abi,
        bytecode: "0x" + c.evm.bytecode.object,
        deployedBytecode: "0x" + c.evm.deployedBytecode.object,
      };
      artifacts[contractName] = JSON.stringify(artifact, null, 2) + "\n";
    }
  }
  return artifacts;
}

function main() {
  const args = parseArgs(process.argv.slice(2));
  const artifacts = compile();
  if (args.check) {
    const stale = [];
    const committed = fs.existsSync(args.out)
      ? fs.readdirSync(args.out).filter((f) => f.endsWith(".json"))
      : [];
    for (const [name, text] of Object.entries(artifacts)) {
      const file = path.join(args.out, `${name}.json`);
      if (!fs.existsSync(file)) stale.push(`missing: ${name}.json`);
      else if (fs.readFileSync(file, "utf8") !== text) stale.push(`stale: ${name}.json`);
    }
    for (const f of committed) {
      if (!artifacts[f.replace(/\.json$/, "")]) stale.push(`extra: ${f}`);
    }
    if (stale.length) {
      process.stderr.write(
        `contract artifacts differ from the sources (run scripts/compile_contracts):\n  ${stale.join("\n  ")}\n`,
      );
      process.exit(1);
    }
    process.stdout.write(`contract artifacts up to date (${Object.keys(artifacts).length})\n`);
    return;
  }
  fs.mkdirSync(args.out, { recursive: true });
  for (const f of fs.readdirSync(args.out)) {
    if (f.endsWith(".json") && !artifacts[f.replace(/\.json$/, "")]) {
      fs.unlinkSync(path.join(args.out, f));
    }
  }
  for (const [name, text] of Object.entries(artifacts)) {
    fs.writeFileSync(path.join(args.out, `${name}.json`), text);
    process.stdout.write(`wrote ${path.relative(ROOT, path.join(args.out, name + ".json"))}\n`);
  }
}

try {
  main();
} catch (err) {
  process.stderr.write(`compile_contracts: ${err.message}\n`);
  process.exit(2);
}
