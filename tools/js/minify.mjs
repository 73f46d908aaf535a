// Reads {"name": "javascript source", ...} as JSON on stdin; writes {"name": "minified", ...}.
// Run by tools/js/build.py, which owns everything else (templates, Jinja markup, files).
import { minify } from "terser";

const OPTIONS = {
  // ES2015 output (arrow functions, shorthand methods): every browser with fetch keepalive,
  // which the runtime needs anyway, runs it. unsafe_arrows turns a function expression into
  // an arrow when it uses neither `this` nor `arguments` (the runtime's history wrappers do).
  ecma: 2015,
  compress: { passes: 3, unsafe_arrows: true, unsafe_methods: true },
  mangle: true,  // local names only: property names are the adapter API
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
