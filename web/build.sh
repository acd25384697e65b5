#!/usr/bin/env bash
# Builds the dashboard into web/dist, which is committed and embedded in the iotpipe
# binary (src/api/dashboard.rs), so that building iotpipe needs neither Node nor npm.
# Run it after changing anything under web/src, then commit web/dist.
set -euo pipefail
cd "$(dirname "$0")"
# Exactly the versions in package-lock.json.
npm ci --no-audit --no-fund
npx tsc --noEmit -p .
npx esbuild src/main.ts --bundle --minify --format=iife --target=es2020 \
    --legal-comments=none --outfile=dist/app.js \
    --banner:js="/*! iotpipe dashboard; bundles uPlot $(node -p 'require("uplot/package.json").version') (c) Leon Sorokin, MIT License */" \
    --banner:css="/*! iotpipe dashboard; includes uPlot's stylesheet (c) Leon Sorokin, MIT License */"
cp src/index.html src/icon.svg dist/
ls -l dist
