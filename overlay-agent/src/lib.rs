//! overlay-agent: flannel-compatible VXLAN overlay with an eBPF datapath.
//!
//! Wings by concern, each importing only downward (docs/ARCHITECTURE.md):
//! `cli` (the face) → `daemon` (composition root) → `reconcile` and `ops` → `control` (etcd),
//! `node` (netlink, ethtool, sysctl) and `dataplane` (the only aya user) → `family`, `metrics`.

pub mod cli;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod family;
pub mod metrics;
pub mod node;
pub mod ops;
pub mod reconcile;

/// The wings' import rules (docs/ARCHITECTURE.md), checked on the source: each wing uses only
/// the wings below it, and the outside crates that belong to one wing stay there.
#[cfg(test)]
mod architecture {
    use std::{collections::BTreeSet, fs, path::Path};

    /// Each wing and the wings it may use.
    const WINGS: &[(&str, &[&str])] = &[
        ("family", &[]),
        ("metrics", &["family"]),
        ("control", &["family", "metrics"]),
        ("node", &["family", "metrics"]),
        ("dataplane", &["family", "metrics"]),
        (
            "reconcile",
            &["control", "node", "dataplane", "family", "metrics"],
        ),
        ("ops", &["control", "node", "dataplane", "family", "metrics"]),
        (
            "daemon",
            &[
                "control",
                "node",
                "dataplane",
                "reconcile",
                "ops",
                "family",
                "metrics",
            ],
        ),
        // The face may use every wing.
        ("cli", &["*"]),
    ];

    /// Outside crates and the only wings that may use them.
    const CRATES: &[(&str, &[&str])] = &[
        ("aya", &["dataplane"]),
        ("aya_obj", &["dataplane"]),
        ("etcd_client", &["control"]),
        ("clap", &["cli"]),
    ];

    /// The wing of a file under src/: its first path component, without `.rs`.
    fn wing(rel: &Path) -> String {
        let first = rel.components().next().unwrap().as_os_str().to_string_lossy();
        first.trim_end_matches(".rs").to_string()
    }

    /// The source without comments: what a doc comment names is not an import.
    fn code(src: &str) -> String {
        src.lines()
            .map(|l| l.split("//").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The crate-level modules `src` refers to: `crate::x` and each top-level name in
    /// `crate::{x::…, y, …}`.
    fn crate_refs(src: &str) -> BTreeSet<String> {
        let ident = |s: &str| -> String {
            s.chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect()
        };
        let mut out = BTreeSet::new();
        for (i, _) in src.match_indices("crate::") {
            let rest = &src[i + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let (mut depth, mut start) = (1, true);
                for (j, c) in group.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 1 => break,
                        '}' => depth -= 1,
                        ',' if depth == 1 => start = true,
                        c if start && !c.is_whitespace() => {
                            out.insert(ident(&group[j..]));
                            start = false;
                        }
                        _ => {}
                    }
                }
            } else {
                out.insert(ident(rest));
            }
        }
        out
    }

    fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                sources(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    #[test]
    fn each_wing_imports_only_downward_and_outside_crates_stay_in_their_wing() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        sources(&src, &mut files);
        files.sort();
        let mut broken = Vec::new();
        for f in &files {
            let rel = f.strip_prefix(&src).unwrap();
            let w = wing(rel);
            if w == "lib" || w == "main" {
                continue;
            }
            let (_, allowed) = WINGS
                .iter()
                .find(|(name, _)| *name == w)
                .unwrap_or_else(|| panic!("{} is in no wing of WINGS", rel.display()));
            let text = code(&fs::read_to_string(f).unwrap());
            for r in crate_refs(&text) {
                if r != w && !allowed.contains(&r.as_str()) && allowed != &["*"] {
                    broken.push(format!("{} ({w}) uses crate::{r}", rel.display()));
                }
            }
            for (krate, owners) in CRATES {
                let used = text.contains(&format!("{krate}::")) || text.contains(&format!("use {krate}"));
                if used && !owners.contains(&w.as_str()) {
                    broken.push(format!("{} ({w}) uses {krate}", rel.display()));
                }
            }
        }
        assert!(
            broken.is_empty(),
            "imports against the wing rules:\n  {}",
            broken.join("\n  ")
        );
        // The checker itself: a grouped import and an upward arrow are seen.
        let seen = crate_refs("use crate::{\n    control::{a, b},\n    node::x,\n};\nlet y = crate::cli::Z;");
        assert_eq!(seen, ["cli", "control", "node"].map(String::from).into());
    }
}
