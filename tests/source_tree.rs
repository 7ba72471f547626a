//! The source tree, checked from the code.
//!
//! Layers: every `crate::…` path in a module names its own layer or one below
//! it, and a leaf names no other part of tether but `config`. Layers, top to
//! bottom: `tools`, `app`, `downstream`, `http`, `pool`, the leaves. `main.rs`
//! sits above them all and reaches the library as `tether::`.
//!
//! Shape: no function longer than 80 lines (signature to closing brace), and
//! `pool/mod.rs` and every `config/` file under 500 lines, so the rooms stay
//! small enough to read.

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
    ("accesslog", 1),
    ("census", 1),
    ("connection_header", 1),
    ("drain", 1),
    ("h1", 1),
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

/// `src/` and every Rust file under it.
fn sources() -> (PathBuf, Vec<PathBuf>) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    (src, files)
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
    let (src, files) = sources();
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
    let (src, files) = sources();
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

const MAX_FUNCTION_LINES: usize = 80;
const MAX_FILE_LINES: usize = 500;

/// The text with comments, string and character literals blanked out (line
/// breaks kept), so braces and `fn` inside them do not count.
fn code_only(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
        } else if c == 'r'
            && (next == Some('"') || next == Some('#'))
            && !ident(chars.get(i.wrapping_sub(1)))
        {
            // A raw string: r"…", r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            let closing: String = std::iter::once('"')
                .chain((0..hashes).map(|_| '#'))
                .collect();
            let rest: String = chars[j..].iter().collect();
            let end = rest.find(&closing).map_or(chars.len(), |at| {
                j + rest[..at].chars().count() + closing.len()
            });
            for &k in &chars[i..end] {
                out.push(blank(k));
            }
            i = end;
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < chars.len() {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
        } else if c == '\'' && char_literal_len(&chars[i..]).is_some() {
            let len = char_literal_len(&chars[i..]).unwrap_or(1);
            out.extend(std::iter::repeat_n(' ', len));
            i += len;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn ident(c: Option<&char>) -> bool {
    c.is_some_and(|c| c.is_alphanumeric() || *c == '_')
}

/// The length of a character literal at the start of `s` (`'x'`, `'\n'`,
/// `'\''`, `'\u{7f}'`), or `None` for a lifetime.
fn char_literal_len(s: &[char]) -> Option<usize> {
    match s.get(1)? {
        '\\' => {
            let close = s.iter().skip(2).position(|c| *c == '\'')?;
            Some(close + 3)
        }
        _ => (s.get(2)? == &'\'').then_some(3),
    }
}

/// Every function in `code` as (first line, number of lines).
fn functions(code: &str) -> Vec<(usize, usize)> {
    let lines: Vec<&str> = code.lines().collect();
    let mut found = Vec::new();
    for (start, line) in lines.iter().enumerate() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(at) = words.iter().position(|w| *w == "fn") else {
            continue;
        };
        let qualifiers_only = words[..at].iter().all(|w| {
            ["pub", "const", "async", "unsafe", "extern"].contains(w) || w.starts_with("pub(")
        });
        if !qualifiers_only || words.get(at + 1).is_none() {
            continue;
        }
        let mut depth = 0i32;
        let mut opened = false;
        for (offset, body_line) in lines[start..].iter().enumerate() {
            for c in body_line.chars() {
                match c {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            if !opened && body_line.trim_end().ends_with(';') {
                break; // a declaration without a body
            }
            if opened && depth <= 0 {
                found.push((start + 1, offset + 1));
                break;
            }
        }
    }
    found
}

#[test]
fn no_function_in_src_is_longer_than_80_lines() {
    let (_, files) = sources();
    let mut long = Vec::new();
    let mut counted = 0;
    for file in &files {
        let code = code_only(&std::fs::read_to_string(file).unwrap());
        for (line, length) in functions(&code) {
            counted += 1;
            if length > MAX_FUNCTION_LINES {
                long.push(format!("{}:{line}: {length} lines", file.display()));
            }
        }
    }
    assert!(counted > 500, "found only {counted} functions");
    assert!(
        long.is_empty(),
        "functions over {MAX_FUNCTION_LINES} lines:\n{}",
        long.join("\n")
    );
}

#[test]
fn pool_mod_and_config_files_stay_under_500_lines() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![src.join("pool/mod.rs")];
    rust_files(&src.join("config"), &mut files);
    for file in files {
        let lines = std::fs::read_to_string(&file).unwrap().lines().count();
        assert!(
            lines < MAX_FILE_LINES,
            "{} has {lines} lines",
            file.display()
        );
    }
}

#[test]
fn the_reader_skips_literals_and_comments_and_measures_bodies() {
    let text = "fn a() {\n    let s = \"}\"; // }\n    let c = '{';\n    let r = r#\"{\"#;\n}\nfn b<'x>(v: &'x str) -> &'x str { v }\n/* fn c() { */\npub(crate) async fn d() {\n}\n";
    let code = code_only(text);
    assert_eq!(functions(&code), [(1, 5), (6, 1), (8, 2)]);
}
