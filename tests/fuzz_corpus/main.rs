//! Replays the committed fuzz corpus (`fuzz/seeds/<target>/` and
//! `fuzz/corpus/<target>/`) through the fuzz targets, without a fuzzer: the
//! targets are plain functions (`fuzz/src/lib.rs`, compiled in here), so
//! every `cargo test` builds them against the current API and re-checks
//! their properties on every input the fuzzer kept, including each crash
//! ever found. See RELIABILITY.md.

#[path = "../../fuzz/src/lib.rs"]
mod targets;

use std::path::PathBuf;

/// Runs `target` on every file of its seed and corpus folders; returns how
/// many inputs ran.
fn replay(name: &str) -> usize {
    let (_, target) = targets::targets()
        .into_iter()
        .find(|(n, _)| *n == name)
        .expect("a known target");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut inputs = Vec::new();
    for dir in ["seeds", "corpus"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(name)) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("a readable folder").path();
            if path.is_file() {
                inputs.push(path);
            }
        }
    }
    inputs.sort();
    for path in &inputs {
        let data = std::fs::read(path).expect("a readable input");
        let caught = std::panic::catch_unwind(|| target(&data));
        assert!(caught.is_ok(), "{name}: {} fails", path.display());
    }
    inputs.len()
}

/// Every target has a libFuzzer binary and seeds, and every corpus folder
/// belongs to a target (the gateway's need feature `gateway`).
#[test]
fn every_target_is_wired() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).expect("fuzz/Cargo.toml");
    for (name, _) in targets::targets() {
        let bin = std::fs::read_to_string(root.join(format!("fuzz_targets/{name}.rs")))
            .unwrap_or_else(|_| panic!("fuzz/fuzz_targets/{name}.rs is missing"));
        assert!(
            bin.contains(&format!("tower_qwen_fuzz::{name}(")),
            "fuzz_targets/{name}.rs must call tower_qwen_fuzz::{name}"
        );
        assert!(
            manifest.contains(&format!("name = \"{name}\"")),
            "fuzz/Cargo.toml has no [[bin]] {name}"
        );
        let seeds = std::fs::read_dir(root.join("seeds").join(name))
            .map(|d| d.count())
            .unwrap_or(0);
        assert!(seeds > 0, "{name} has no seeds");
    }
    for dir in ["seeds", "corpus"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for entry in entries {
            let name = entry.unwrap().file_name();
            let name = name.to_str().unwrap();
            assert!(
                targets::targets().iter().any(|(n, _)| *n == name)
                    || targets::GATEWAY_TARGETS.contains(&name),
                "fuzz/{dir}/{name} belongs to no target"
            );
        }
    }
}

#[test]
fn sse() {
    assert!(replay("sse") > 0);
}

#[test]
fn classify() {
    assert!(replay("classify") > 0);
}

#[test]
fn retry_after() {
    assert!(replay("retry_after") > 0);
}

#[test]
fn request_info() {
    assert!(replay("request_info") > 0);
}

#[cfg(feature = "gateway")]
#[test]
fn gateway_config() {
    assert!(replay("gateway_config") > 0);
}

#[cfg(feature = "gateway")]
#[test]
fn gateway_router() {
    assert!(replay("gateway_router") > 0);
}
