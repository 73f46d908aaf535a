// Reads {"name": "javascript source", ...} as JSON on stdin; writes {"name": "minified", ...}.
// Run by tools/js/build.py, which owns everything else (templates, Jinja markup, files).
import { minify } from "terser";

const OPTIONS = {
  ecma: 5,                   // the runtime is written for every browser still in use
  compress: { passes: 3 },
  mangle: true,              // local names only: property names are the adapter API
  format: { comments: false },
};

let input = "";
process.stdin.setEncoding("utf8");
for await (const chunk of process.stdin) input += chunk;
const sources = JSON.parse(input);
const output = {};
for (const [name, code] of Object.entries(sources)) {
  output[name] = (await minify({ [name]: code }, OPTIONS)).code;
}
process.stdout.write(JSON.stringify(output));
