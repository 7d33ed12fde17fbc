// node --test: the shared vectors against the browser client's modules.
import { test } from "node:test";
import { readFileSync } from "node:fs";
import { webcrypto } from "node:crypto";
import { checkCodec, checkHandshake } from "./vectors.mjs";

// libsodium's ESM build wants the Web Crypto random source, global from Node 19 on.
globalThis.crypto ??= webcrypto;
const { default: sodium } = await import("libsodium-wrappers-sumo");

const dir = process.env.SIMZMQ_VECTORS ?? new URL("../../../shared/vectors/", import.meta.url).pathname;
const load = (name) => JSON.parse(readFileSync(`${dir}/${name}`, "utf8"));

test("codec.json: every message in bin and msgpack, every malformed payload refused", () => {
  checkCodec(load("codec.json"));
});

test("handshake.json: keys, HELLO, frames, tampering", async () => {
  await sodium.ready;
  checkHandshake(sodium, load("handshake.json"));
});

test("codec-groups.json: the section 7 messages the page speaks (presence and typing), every malformed payload refused", async () => {
  const { SCHEMA } = await import("../../simzmq/web/static/js/codec.js");
  const vectors = load("codec-groups.json");
  const known = new Set(Object.values(SCHEMA).map(([type]) => type));
  const messages = vectors.messages.filter((v) => known.has(v.type));
  if (!messages.some((v) => v.name === "Watch") || !messages.some((v) => v.name === "PresenceList")) {
    throw new Error("codec-groups.json has no Watch or PresenceList vector");
  }
  checkCodec({ messages, malformed: vectors.malformed });
});
