//! No module of the crate depends on itself through others: for every depth (the top-level
//! modules, then their submodules, ...), the graph of `crate::` and `super::` references
//! between the modules' production code has no cycle. Test code (`#[cfg(test)]` items and the
//! test-support modules) and comments are left out: a test may reach anywhere.
//!
//! A cycle is reported with the references that make it, file by file, so that the fix (a
//! type moved to the module both sides need) is plain. docs/architecture.md shows the graph.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Files and folders that hold only test support (behind `test-support` or `cfg(test)`).
fn is_test_support(relative: &str) -> bool {
    relative.split('/').any(|part| {
        let stem = part.strip_suffix(".rs").unwrap_or(part);
        matches!(
            stem,
            "tests" | "testing" | "conformance" | "testimage" | "test_registry"
        ) || stem.ends_with("_tests")
    })
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
}

/// The source without comments and without `#[cfg(test)]` / `#[cfg(any(test, ...))]` items.
fn production_code(source: &str) -> String {
    let without_comments: String = source
        .lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let text = without_comments.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        let rest = &without_comments[i..];
        if rest.starts_with("#[cfg(test)]") || rest.starts_with("#[cfg(any(test") {
            // Skip the attribute and its item: up to a `;` before any `{`, or the matching `}`.
            let mut k = i + rest.find(']').unwrap_or(0) + 1;
            while k < text.len() && text[k] != b'{' && text[k] != b';' {
                k += 1;
            }
            if k < text.len() && text[k] == b'{' {
                let mut depth = 0usize;
                while k < text.len() {
                    match text[k] {
                        b'{' => depth += 1,
                        b'}' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                    k += 1;
                }
            }
            i = k + 1;
            continue;
        }
        let c = rest.chars().next().expect("a character");
        out.push(c);
        i += c.len_utf8();
    }
    out
}

/// `a/b/mod.rs` and `a/b.rs` are module `a::b`.
fn module_of(relative: &str) -> String {
    let path = relative.strip_suffix(".rs").unwrap_or(relative);
    let path = path.strip_suffix("/mod").unwrap_or(path);
    path.replace('/', "::")
}

/// The module paths a piece of code refers to: `crate::x::y...` as written, `super::x` from
/// `module`'s parent.
fn references(module: &str, code: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
            .collect::<String>()
            .trim_end_matches(':')
            .to_string()
    };
    let mut found = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let before = code[..at].chars().last();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        found.insert(ident(&code[at + "crate::".len()..]));
    }
    for (at, _) in code.match_indices("super::") {
        let before = code[..at].chars().last();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        // `super::super::x` climbs twice.
        let mut parent: Vec<&str> = module.split("::").collect();
        let mut rest = &code[at..];
        while let Some(after) = rest.strip_prefix("super::") {
            parent.pop();
            rest = after;
        }
        let target = ident(rest);
        if !target.is_empty() {
            let mut path = parent.join("::");
            if !path.is_empty() {
                path.push_str("::");
            }
            path.push_str(&target);
            found.insert(path);
        }
    }
    found
}

/// The deepest known module `path` names (a path may end in an item: `store::Store`).
fn resolve<'m>(path: &str, modules: &'m BTreeSet<String>) -> Option<&'m String> {
    let mut parts: Vec<&str> = path.split("::").collect();
    while !parts.is_empty() {
        if let Some(m) = modules.get(&parts.join("::")) {
            return Some(m);
        }
        parts.pop();
    }
    None
}

/// Strongly connected components of more than one node (Tarjan).
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<BTreeSet<String>> {
    struct State<'g> {
        graph: &'g BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        next: usize,
        found: Vec<BTreeSet<String>>,
    }
    fn visit<'g>(s: &mut State<'g>, v: &'g str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        let graph = s.graph;
        for w in graph.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = BTreeSet::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.insert(w.to_string());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                s.found.push(component);
            }
        }
    }
    let mut state = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !state.index.contains_key(v.as_str()) {
            visit(&mut state, v);
        }
    }
    state.found
}

fn prefix(module: &str, depth: usize) -> String {
    module
        .split("::")
        .take(depth)
        .collect::<Vec<_>>()
        .join("::")
}

#[test]
fn no_module_depends_on_itself_through_others() {
    // The host and the crates beside it, each with modules the walk must find.
    let host = Path::new(env!("CARGO_MANIFEST_DIR"));
    let crates = host.join("..").join("crates");
    let mut report = Vec::new();
    let walks: [(PathBuf, &[&str]); 8] = [
        (host.join("src"), &["cli", "serve"]),
        (crates.join("api").join("src"), &["tasks", "agent"]),
        (
            crates.join("control").join("src"),
            &["lifecycle", "scheduler::placement"],
        ),
        (crates.join("policy").join("src"), &["runtime", "engine"]),
        (
            crates.join("store").join("src"),
            &["mongo", "sqlite::placement"],
        ),
        (crates.join("worker").join("src"), &["agent", "runner"]),
        (crates.join("executor").join("src"), &["capture"]),
        (crates.join("model").join("src"), &["protocol"]),
    ];
    for (src, expected) in walks {
        report.extend(cycles_in(&src, expected));
    }
    assert!(
        report.is_empty(),
        "module cycles (move what both sides need to a module they can both depend on):\n{}",
        report.join("\n")
    );
}

/// The cycles between the modules of the crate whose sources are under `src`, described with
/// the references that make them.
fn cycles_in(src: &Path, expected: &[&str]) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    // (module, file, referenced module)
    let mut refs: Vec<(String, String, String)> = Vec::new();
    let mut modules = BTreeSet::new();
    let mut sources = Vec::new();
    for file in &files {
        let relative = file
            .strip_prefix(src)
            .expect("under src")
            .to_string_lossy()
            .replace('\\', "/");
        if relative == "lib.rs" || relative == "main.rs" || is_test_support(&relative) {
            continue;
        }
        let module = module_of(&relative);
        modules.insert(module.clone());
        let source = std::fs::read_to_string(file)
            .unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        sources.push((module, relative, production_code(&source)));
    }
    assert!(
        expected.iter().all(|m| modules.contains(*m)),
        "the walk of {} found the crate's modules ({expected:?} among them): {modules:?}",
        src.display()
    );
    for (module, relative, code) in &sources {
        for target in references(module, code) {
            if let Some(resolved) = resolve(&target, &modules) {
                refs.push((module.clone(), relative.clone(), resolved.clone()));
            }
        }
    }

    let mut report = Vec::new();
    for depth in 1..=4 {
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (from, _, to) in &refs {
            if from.split("::").count() < depth || to.split("::").count() < depth {
                continue;
            }
            let (a, b) = (prefix(from, depth), prefix(to, depth));
            // Below the top level, only siblings (same parent) form the graph of that level.
            if a != b && prefix(&a, depth - 1) == prefix(&b, depth - 1) {
                graph.entry(a).or_default().insert(b);
            }
        }
        for component in cycles(&graph) {
            let edges: Vec<String> = refs
                .iter()
                .filter(|(from, _, to)| {
                    let (a, b) = (prefix(from, depth), prefix(to, depth));
                    a != b && component.contains(&a) && component.contains(&b)
                })
                .map(|(from, file, to)| format!("    {file} ({from}) -> {to}"))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            report.push(format!(
                "a cycle between {component:?}:\n{}",
                edges.join("\n")
            ));
        }
    }
    report
}

#[test]
fn the_check_sees_a_cycle_and_ignores_comments_and_test_code() {
    let a = production_code(
        "use crate::b::Thing; // crate::c::Other\n#[cfg(test)]\nmod tests { use crate::d::X; }\nfn f() {}",
    );
    assert_eq!(
        references("a", &a),
        BTreeSet::from(["b::Thing".to_string()])
    );
    assert_eq!(
        references(
            "store::mongo::tasks",
            "use super::codec::x; use super::super::model;"
        ),
        BTreeSet::from([
            "store::mongo::codec::x".to_string(),
            "store::model".to_string()
        ])
    );
    let graph = BTreeMap::from([
        ("a".to_string(), BTreeSet::from(["b".to_string()])),
        (
            "b".to_string(),
            BTreeSet::from(["a".to_string(), "c".to_string()]),
        ),
        ("c".to_string(), BTreeSet::new()),
    ]);
    assert_eq!(
        cycles(&graph),
        vec![BTreeSet::from(["a".to_string(), "b".to_string()])]
    );
}
