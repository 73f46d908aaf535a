// Reads {"runtime": code, "parts": [[name, code], ...], "shared": {name: mangled}} as JSON on
// stdin; writes {"name": "minified", ...}. Run by tools/js/build.py, which owns everything else
// (templates, Jinja markup, files).
//
// The parts end up in one function's scope (the runtime's body first, then the site's features,
// the money helpers and the enabled adapters), so they are minified as one program would be, only separately:
// - one name cache across the runs: a top-level name gets the same short name in every part
//   that declares or uses it, and no part reuses a name another part's top level holds;
// - `shared` seeds that cache with the wrapper function's parameters (window, document,
//   config), which the generated template declares;
// - a top-level name that a later part uses is kept even when its own part does not use it
//   (compress.top_retain), so terser can still inline and drop the rest of the top level.
import { minify } from "terser";

const BASE = {
  // ES2020 in and out: the sources use ?. and ?? where they say it more plainly, and terser
  // may write arrows, shorthand methods, ?? and ?. . Floor: Chrome 80, Safari 13.1, Firefox 74
  // (2020). Fetch keepalive, which the runtime relies on, already needs Chrome 66, Safari 13,
  // Firefox 133; only Chrome 66-79 and Safari 13.0 (2018-19 releases) lose the tag, which
  // fails to parse there and does nothing (the page is unaffected: it is its own script).
  // unsafe_arrows turns a function expression into an arrow when it uses neither `this` nor
  // `arguments` (the runtime's history wrappers do).
  ecma: 2020,
  parse: { bare_returns: true },  // the runtime's body is a function body
  format: { comments: false },
};

function compressOptions(retain) {
  return {
    passes: 3, unsafe_arrows: true, unsafe_methods: true,
    toplevel: true, top_retain: (def) => retain.has(def.name),
    keep_fargs: false, pure_getters: true,
    // The minified build does not log (READABLE is false there): drop the calls, arguments and all.
    pure_funcs: ["log"],
    // The parts read the runtime's READABLE flag (debug-build-only code); false here, like the
    // runtime's own (build.py), so terser drops that code from every part.
    global_defs: { READABLE: false },
  };
}

// The free names a part uses: the top-level names it needs from the parts before it.
async function freeNames(code) {
  const { ast } = await minify(code, { ...BASE, compress: false, mangle: false, format: { ast: true, code: false } });
  ast.figure_out_scope();
  return [...ast.globals.keys()];
}

let input = "";
process.stdin.setEncoding("utf8");
for await (const chunk of process.stdin) input += chunk;
const { runtime, parts, shared } = JSON.parse(input);

const needed = new Set();
for (const [, code] of parts) for (const name of await freeNames(code)) needed.add(name);
needed.delete("READABLE");  // a constant (global_defs), not a name the runtime must keep

const nameCache = { vars: { props: Object.fromEntries(Object.entries(shared).map(([k, v]) => ["$" + k, v])) } };
const output = {};
for (const [name, code] of [["runtime", runtime], ...parts]) {
  const result = await minify({ [name]: code }, {
    ...BASE, nameCache, compress: compressOptions(needed), mangle: { toplevel: true },
  });
  output[name] = result.code;
}
process.stdout.write(JSON.stringify(output));
