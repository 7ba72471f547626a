//! The layers of the source tree, checked from the code: every `crate::…`
//! path in a module names its own layer or one below it, and a leaf names no
//! other part of tether but `config`.
//!
//! Layers, top to bottom: `tools`, `app`, `downstream`, `http`, `pool`, the
//! leaves. `main.rs` sits above them all and reaches the library as `tether::`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Rank of each top-level module: a module may name only ranks at or below its own.
const LAYERS: &[(&str, u8)] = &[
    ("tools", 6),
    ("app", 5),
    ("downstream", 4),
    ("http", 3),
    ("pool", 2),
    ("config", 1),
    ("census", 1),
    ("connection_header", 1),
    ("drain", 1),
    ("memory", 1),
    ("metrics", 1),
    ("notify", 1),
    ("rlimit", 1),
    ("sock", 1),
    ("telemetry", 1),
];

/// What a leaf may name of tether.
const LEAF_MAY_USE: &[&str] = &["config"];

fn rank(module: &str) -> Option<u8> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, r)| *r)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a source file belongs to (`src/pool/h1.rs` → `pool`).
fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).unwrap();
    let first = relative.components().next().unwrap().as_os_str();
    first.to_string_lossy().trim_end_matches(".rs").to_owned()
}

/// The top-level modules a file names through `crate::`, comments left out;
/// `use crate::{a, b::c}` groups are read too.
fn named_modules(text: &str) -> BTreeSet<String> {
    let mut named = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                for item in group[..end].split(',') {
                    let name: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() {
                        named.insert(name);
                    }
                }
                continue;
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                named.insert(name);
            }
        }
    }
    named
}

#[test]
fn every_import_points_down_and_leaves_stay_leaves() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut wrong = Vec::new();
    let mut seen = 0;
    for file in &files {
        let module = module_of(&src, file);
        if module == "main" || module == "lib" {
            continue;
        }
        let own = rank(&module)
            .unwrap_or_else(|| panic!("{module} (from {}) has no layer", file.display()));
        seen += 1;
        let text = std::fs::read_to_string(file).unwrap();
        for named in named_modules(&text) {
            if named == module {
                continue;
            }
            let Some(theirs) = rank(&named) else {
                // Items re-exported at the crate root (`crate::Config`).
                continue;
            };
            let leaf_reaching_sideways = own == 1 && !LEAF_MAY_USE.contains(&named.as_str());
            if theirs > own || leaf_reaching_sideways {
                wrong.push(format!(
                    "{} ({module}) names crate::{named}",
                    file.display()
                ));
            }
        }
    }
    assert!(seen > 20, "read only {seen} files under {}", src.display());
    assert!(
        wrong.is_empty(),
        "imports against the layers:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn no_two_top_level_modules_name_each_other() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut edges = BTreeSet::new();
    for file in &files {
        let module = module_of(&src, file);
        let text = std::fs::read_to_string(file).unwrap();
        for named in named_modules(&text) {
            if named != module && rank(&named).is_some() {
                edges.insert((module.clone(), named));
            }
        }
    }
    let cycles: Vec<_> = edges
        .iter()
        .filter(|(a, b)| a < b && edges.contains(&(b.clone(), a.clone())))
        .collect();
    assert!(cycles.is_empty(), "modules naming each other: {cycles:?}");
}

#[test]
fn the_reader_sees_grouped_and_inline_paths() {
    let text = "use crate::{config::X, pool};\nlet a = crate::sock::f(); // crate::http\n";
    let named: Vec<_> = named_modules(text).into_iter().collect();
    assert_eq!(named, ["config", "pool", "sock"]);
}
