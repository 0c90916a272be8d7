#!/usr/bin/env bash
# Rebuild cryoem/explore/static/explorer.js, the bundled front end of `cryoem explore`, from js/explorer:
# npm installs the exact versions of js/explorer/package-lock.json (regl-scatterplot, NGL, esbuild), and esbuild
# bundles src/main.js into one minified file, so that the page needs no network. Commit the result.
# Needs node >= 18 and npm (Debian: apt-get install nodejs npm).
set -euo pipefail
cd "$(dirname "$0")/../js/explorer"
npm ci --no-audit --no-fund --ignore-scripts >&2
OUT=../../cryoem/explore/static/explorer.js
npx --no-install esbuild src/main.js --bundle --minify --format=iife --target=es2020 --legal-comments=none \
  --log-level=warning --metafile=build-meta.json --outfile="$OUT"
# the licences of the packages the bundle holds (esbuild's list of inputs), beside it
node -e '
const fs = require("fs"), lock = require("./package-lock.json"), meta = require("./build-meta.json");
const used = new Set(Object.keys(meta.inputs).map(f => (f.match(/^(.*node_modules\/(?:@[^/]+\/)?[^/]+)/) || [])[1])
  .filter(Boolean));
const out = [...used].sort().map(dir => {
  const v = lock.packages[dir] || {};
  const lic = ["LICENSE", "LICENSE.md", "LICENSE.txt", "license", "LICENCE"].map(f => `${dir}/${f}`)
    .find(f => fs.existsSync(f));
  return `== ${dir.replace(/^.*node_modules\//, "")} ${v.version} (${v.license || "see below"})\n` +
    (lic ? fs.readFileSync(lic, "utf8") : "");
});
fs.writeFileSync("../../cryoem/explore/static/explorer.js.LICENSES.txt", out.join("\n"));
'
rm -f build-meta.json
sha256sum "$OUT" >&2
