//! The crate's modules import each other without a circle: every stage sits above what it uses,
//! and nothing below a stage imports it. Read from the sources (`crate::` paths, and `lib.rs`'s
//! own module paths), so anyone can check it with `cargo test -p scheduler --test imports`; run it
//! with `-- --nocapture` to see the modules in layers, lowest first.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The root module's name in the graph.
const ROOT: &str = "lib";

/// The source with comments removed (a `//` to the end of its line; the crate has no `/* */`).
fn code(text: &str) -> String {
    text.lines()
        .map(|l| l.find("//").map_or(l, |i| &l[..i]))
        .collect::<Vec<_>>()
        .join("\n")
}

fn ident_at(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The first segment of every path after `prefix` (`crate::a::b`, `crate::{a::X, b}`).
fn first_segments(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices(prefix) {
        let before = code[..i].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue; // part of a longer path or name
        }
        let rest = &code[i + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut item_start = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && !c.is_whitespace() => {
                        out.insert(ident_at(&group[j..]).to_string());
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident_at(rest).to_string());
        }
    }
    out.retain(|s| !s.is_empty());
    out
}

/// Module -> the modules it imports.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(&src).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.extension().is_some_and(|e| e == "rs") {
            let name = path
                .file_stem()
                .and_then(|s| s.to_str())
                .expect("a UTF-8 file name")
                .to_string();
            let text = std::fs::read_to_string(&path).expect("a readable source");
            files.insert(name, code(&text));
        }
    }
    let modules: BTreeSet<String> = files.keys().filter(|m| *m != ROOT).cloned().collect();
    let mut graph = BTreeMap::new();
    for (name, text) in &files {
        let mut deps = BTreeSet::new();
        for seg in first_segments(text, "crate::") {
            // A module, or an item of the root (`crate::Error`): an arrow to the root.
            deps.insert(if modules.contains(&seg) {
                seg
            } else {
                ROOT.into()
            });
        }
        if name == ROOT {
            // The root names its modules without `crate::`.
            for m in &modules {
                let used = text.match_indices(&format!("{m}::")).any(|(i, _)| {
                    let before = text[..i].chars().next_back();
                    !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                });
                if used {
                    deps.insert(m.clone());
                }
            }
        }
        deps.remove(name);
        graph.insert(name.clone(), deps);
    }
    graph
}

/// The modules in layers: each imports only modules of lower layers; `Err` names a circle.
fn layers(graph: &BTreeMap<String, BTreeSet<String>>) -> Result<Vec<Vec<String>>, Vec<String>> {
    let mut placed: BTreeSet<String> = BTreeSet::new();
    let mut out = Vec::new();
    while placed.len() < graph.len() {
        let layer: Vec<String> = graph
            .iter()
            .filter(|(m, deps)| !placed.contains(*m) && deps.iter().all(|d| placed.contains(d)))
            .map(|(m, _)| m.clone())
            .collect();
        if layer.is_empty() {
            return Err(circle(graph, &placed));
        }
        placed.extend(layer.iter().cloned());
        out.push(layer);
    }
    Ok(out)
}

/// One circle among the modules not placed: follow unplaced imports until a module repeats.
fn circle(graph: &BTreeMap<String, BTreeSet<String>>, placed: &BTreeSet<String>) -> Vec<String> {
    let mut path: Vec<String> = vec![graph
        .keys()
        .find(|m| !placed.contains(*m))
        .expect("an unplaced module")
        .clone()];
    loop {
        let last = path.last().expect("a path");
        let next = graph[last]
            .iter()
            .find(|d| !placed.contains(*d))
            .expect("an unplaced module imports an unplaced module")
            .clone();
        if let Some(at) = path.iter().position(|m| *m == next) {
            let mut c = path[at..].to_vec();
            c.push(next);
            return c;
        }
        path.push(next);
    }
}

#[test]
fn the_modules_import_each_other_without_a_circle() {
    let graph = graph();
    assert!(graph.len() > 20, "the sources were found: {graph:?}");
    match layers(&graph) {
        Ok(layers) => {
            for (i, layer) in layers.iter().enumerate() {
                println!("{i:2}: {}", layer.join(" "));
            }
        }
        Err(circle) => panic!("import circle: {}", circle.join(" -> ")),
    }
}

#[test]
fn the_stages_sit_above_what_they_use() {
    let graph = graph();
    // Nothing but the root imports the engine (the wiring of the stages).
    for (m, deps) in &graph {
        assert!(
            m == ROOT || !deps.contains("engine"),
            "{m} imports the engine"
        );
    }
    // No module imports the root's items (the root is above every module, testkit aside).
    for (m, deps) in &graph {
        assert!(
            m == "testkit" || !deps.contains(ROOT),
            "{m} imports from the crate root"
        );
    }
}

#[test]
fn the_reader_of_imports_finds_grouped_and_nested_paths() {
    let text = code(
        "use crate::{a::X, b, c::{D, E}};\nuse crate::f::G; // crate::ignored\nlet x = my_crate::h;",
    );
    let found = first_segments(&text, "crate::");
    let want: BTreeSet<String> = ["a", "b", "c", "f"].iter().map(|s| s.to_string()).collect();
    assert_eq!(found, want);
    let mut g = BTreeMap::new();
    g.insert("x".to_string(), BTreeSet::from(["y".to_string()]));
    g.insert("y".to_string(), BTreeSet::from(["x".to_string()]));
    g.insert("z".to_string(), BTreeSet::new());
    let c = layers(&g).expect_err("a circle");
    assert_eq!(c.first(), c.last(), "{c:?}");
    assert_eq!(c.len(), 3, "{c:?}");
}
