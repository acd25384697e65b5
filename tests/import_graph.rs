//! The module import graph of `src/` is a DAG that follows the layer order of
//! `docs/architecture.md`. An arrow is a `crate::x` path (in a `use` line, a grouped or
//! multi-line `use crate::{..}`, or a path written inline) from one top-level module
//! to another: a top-level file is a module by its stem, a folder by its name.
//!
//! Run it alone with `cargo test --test import_graph`; it needs no server.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, bottom first. A module may use those of lower layers and those of its
/// own layer, never one above: a new module must be placed here, and in the doc.
const LAYERS: &[&[&str]] = &[
    &["model", "config", "telemetry"],
    &["registry", "store"],
    &["live"],
    &["pipeline"],
    &["ingest"],
    &["http"],
    &["query"],
    &["api"],
    &["topology"],
    &["ops"],
];

type Graph = BTreeMap<String, BTreeSet<String>>;

/// The crate roots declare the modules rather than use them; `main.rs` is another crate.
const ROOTS: &[&str] = &["lib.rs", "main.rs"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("read src/").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file of `src/` belongs to.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let mut parts = rel.components();
    let first = parts.next()?.as_os_str().to_str()?;
    if parts.next().is_some() {
        return Some(first.to_owned());
    }
    if ROOTS.contains(&first) {
        return None;
    }
    first.strip_suffix(".rs").map(str::to_owned)
}

/// The code without its comments and string literals, which may name modules
/// (intra-doc links, messages) without using them.
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            // Rust block comments nest.
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' && b.get(i + 2) == Some(&b'\'') {
            // A one-character literal such as '"', which would open a string above.
            i += 3;
        } else {
            let c = text[i..].chars().next().expect("in bounds");
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The first segment of every path in a `{..}` group, nested groups included only for
/// their first segment: `{a::b, c::{d, e}, self}` gives `a` and `c`.
fn group_heads(group: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut item = String::new();
    for c in group.chars().chain([',']) {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                let head: String = item.trim().chars().take_while(|c| is_ident(*c)).collect();
                if !head.is_empty() && head != "self" {
                    heads.push(head);
                }
                item.clear();
                continue;
            }
            _ => {}
        }
        item.push(c);
    }
    heads
}

/// The names that follow `crate::` in `code`, as first path segments.
fn crate_paths(code: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().next_back();
        let after = &rest[at + "crate::".len()..];
        rest = after;
        // `$crate::` (in a macro) is this crate too; `foo_crate::` is not.
        if before.is_some_and(is_ident) {
            continue;
        }
        let after = after.trim_start();
        if let Some(group) = after.strip_prefix('{') {
            let mut depth = 1;
            let end = group
                .char_indices()
                .find(|(_, c)| {
                    match c {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        _ => {}
                    }
                    depth == 0
                })
                .map_or(group.len(), |(i, _)| i);
            found.extend(group_heads(&group[..end]));
        } else {
            let head: String = after.chars().take_while(|c| is_ident(*c)).collect();
            if !head.is_empty() {
                found.push(head);
            }
        }
    }
    found
}

/// The arrows between the top-level modules of `src/`.
fn import_graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(&src, f)).collect();
    let mut graph: Graph = modules
        .iter()
        .map(|m| (m.clone(), BTreeSet::new()))
        .collect();
    for file in &files {
        let Some(from) = module_of(&src, file) else {
            continue;
        };
        let text = std::fs::read_to_string(file).expect("read a source file");
        for to in crate_paths(&code_only(&text)) {
            // Names that are no module are the root's re-exports (`crate::Config`).
            if to != from && modules.contains(&to) {
                graph.get_mut(&from).expect("every module").insert(to);
            }
        }
    }
    graph
}

/// A cycle of `graph`, as the modules along it with the first repeated at the end.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        node: &str,
        graph: &Graph,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let start = path.iter().position(|n| n == node).expect("on the path");
                let mut cycle = path[start..].to_vec();
                cycle.push(node.to_owned());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(node.to_owned(), Mark::Open);
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, marks, path) {
                return Some(cycle);
            }
        }
        path.pop();
        marks.insert(node.to_owned(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut marks, &mut Vec::new()))
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// Arrows that run up the layer order, as "from -> to".
fn upward_arrows(graph: &Graph) -> Vec<String> {
    let mut up = Vec::new();
    for (from, tos) in graph {
        for to in tos {
            if let (Some(f), Some(t)) = (layer_of(from), layer_of(to)) {
                if t > f {
                    up.push(format!("{from} -> {to}"));
                }
            }
        }
    }
    up
}

fn graph_of(edges: &[(&str, &str)]) -> Graph {
    let mut graph = Graph::new();
    for (from, to) in edges {
        graph
            .entry((*from).to_owned())
            .or_default()
            .insert((*to).to_owned());
        graph.entry((*to).to_owned()).or_default();
    }
    graph
}

#[test]
fn src_imports_form_a_dag() {
    let graph = import_graph();
    assert!(
        graph.len() >= 10 && graph.values().map(BTreeSet::len).sum::<usize>() >= 20,
        "the parser found too little to judge: {graph:?}"
    );
    if let Some(cycle) = find_cycle(&graph) {
        panic!("src/ has an import cycle: {}", cycle.join(" -> "));
    }
}

#[test]
fn src_imports_point_down_the_layers() {
    let graph = import_graph();
    let unplaced: Vec<&String> = graph.keys().filter(|m| layer_of(m).is_none()).collect();
    assert!(
        unplaced.is_empty(),
        "modules in no layer of tests/import_graph.rs (and docs/architecture.md): {unplaced:?}"
    );
    let up = upward_arrows(&graph);
    assert!(up.is_empty(), "imports that run up the layers: {up:?}");
}

#[test]
fn the_cycle_finder_names_a_cycle() {
    let cyclic = graph_of(&[("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")]);
    assert_eq!(
        find_cycle(&cyclic),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    let two = graph_of(&[("api", "ingest"), ("ingest", "api")]);
    assert_eq!(find_cycle(&two).map(|c| c.len()), Some(3));
    let dag = graph_of(&[("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")]);
    assert_eq!(find_cycle(&dag), None);
}

#[test]
fn upward_arrows_are_named() {
    let graph = graph_of(&[("store", "model"), ("store", "pipeline")]);
    assert_eq!(upward_arrows(&graph), vec!["store -> pipeline".to_owned()]);
}

#[test]
fn the_parser_reads_every_form_of_path() {
    let code = r#"
        use crate::model::{DeviceId, UserId};
        use crate::{config, live::{Live, LiveError}, self};
        use crate::{
            pipeline::Pipeline,
            store,
        };
        fn f() -> crate::telemetry::Reason { $crate::registry::x() }
        // use crate::commented;
        /* crate::blocked /* nested */ crate::still_blocked */
        const S: &str = "crate::quoted";
        const C: char = '"';
        use my_crate::not_ours;
    "#;
    let mut found = crate_paths(&code_only(code));
    found.sort();
    assert_eq!(
        found,
        [
            "config",
            "live",
            "model",
            "pipeline",
            "registry",
            "store",
            "telemetry"
        ]
    );
}
