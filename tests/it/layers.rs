//! The module structure stays one-way: inside each crate, no top-level module reaches
//! back to a module that depends on it (ARCHITECTURE.md, "Module dependencies"). The
//! dependencies are read from the sources (`crate::name` paths, also inside
//! `use crate::{...}` groups), so a new cycle fails here with the modules that form it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module → the top-level modules of the same crate it names.
fn dependencies(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap();
            let first = rel.components().next().unwrap().as_os_str().to_string_lossy().to_string();
            let module = first.trim_end_matches(".rs").to_string();
            if module == "lib" || module == "main" {
                continue;
            }
            let text: String = std::fs::read_to_string(&path)
                .unwrap()
                .lines()
                .map(|l| l.split("//").next().unwrap_or(""))
                .collect::<Vec<_>>()
                .join("\n");
            let named = deps.entry(module.clone()).or_default();
            for (i, _) in text.match_indices("crate::") {
                let rest = &text[i + "crate::".len()..];
                if let Some(group) = rest.strip_prefix('{') {
                    // Top-level names of a `crate::{a, b::c, d::{e, f}}` group.
                    let (mut depth, mut cur) = (0, String::new());
                    for ch in group.chars() {
                        match ch {
                            '{' => depth += 1,
                            '}' if depth == 0 => break,
                            '}' => depth -= 1,
                            ',' if depth == 0 => {
                                named.insert(head(&cur));
                                cur.clear();
                                continue;
                            }
                            _ => {}
                        }
                        if depth == 0 {
                            cur.push(ch);
                        }
                    }
                    named.insert(head(&cur));
                } else {
                    named.insert(head(rest));
                }
            }
            named.remove(&module);
        }
    }
    let modules: BTreeSet<String> = deps.keys().cloned().collect();
    for named in deps.values_mut() {
        named.retain(|m| modules.contains(m));
    }
    deps
}

fn head(path: &str) -> String {
    path.trim().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect()
}

/// The strongly connected components with more than one module (Tarjan).
fn cycles(deps: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct T<'a> {
        deps: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        let i = t.index.len();
        t.index.insert(v, i);
        t.low.insert(v, i);
        t.stack.push(v);
        for w in &t.deps[v] {
            let w = w.as_str();
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                t.low.entry(v).and_modify(|l| *l = (*l).min(lw));
            } else if t.stack.contains(&w) {
                let iw = t.index[w];
                t.low.entry(v).and_modify(|l| *l = (*l).min(iw));
            }
        }
        if t.low[v] == t.index[v] {
            let mut c = Vec::new();
            while let Some(w) = t.stack.pop() {
                c.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if c.len() > 1 {
                c.sort();
                t.out.push(c);
            }
        }
    }
    let mut t = T { deps, index: BTreeMap::new(), low: BTreeMap::new(), stack: Vec::new(), out: Vec::new() };
    for v in deps.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

#[test]
fn every_crate_s_modules_depend_one_way() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for krate in ["models", "runtime", "actors", "protocols"] {
        let deps = dependencies(&root.join(krate).join("src"));
        assert!(deps.len() > 3, "{krate}: read its modules");
        let found = cycles(&deps);
        assert!(found.is_empty(), "{krate}: modules that depend on one another in a circle: {found:?}\n{deps:#?}");
    }
}

#[test]
fn the_cycle_check_finds_a_cycle() {
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    deps.insert("a".into(), ["b".to_string()].into());
    deps.insert("b".into(), ["c".to_string()].into());
    deps.insert("c".into(), ["a".to_string()].into());
    deps.insert("d".into(), ["a".to_string()].into());
    assert_eq!(cycles(&deps), vec![vec!["a".to_string(), "b".into(), "c".into()]]);
}
