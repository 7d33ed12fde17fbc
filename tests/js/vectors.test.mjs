// node --test: the shared vectors against the browser client's modules.
import { test } from "node:test";
import { readFileSync } from "node:fs";
import sodium from "libsodium-wrappers-sumo";
import { checkCodec, checkHandshake } from "./vectors.mjs";

const dir = process.env.SIMZMQ_VECTORS ?? new URL("../../../shared/vectors/", import.meta.url).pathname;
const load = (name) => JSON.parse(readFileSync(`${dir}/${name}`, "utf8"));

test("codec.json: every message in bin and msgpack, every malformed payload refused", () => {
  checkCodec(load("codec.json"));
});

test("handshake.json: keys, HELLO, frames, tampering", async () => {
  await sodium.ready;
  checkHandshake(sodium, load("handshake.json"));
});
