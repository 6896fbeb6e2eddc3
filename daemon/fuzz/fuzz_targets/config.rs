//! `Config::parse` on arbitrary text, with an environment where no variable is set and a base folder
//! that does not exist. Inputs whose strings name a path that exists on this machine are skipped, so that
//! `{ file = "/dev/zero" }`-style secrets, TLS files and the like cannot read real files (relative paths
//! resolve under the missing base and fail); so are librdkafka's `plugin.library.paths`, which loads
//! shared libraries. Plugin components are only checked to be files, never loaded, by `parse`.

#![no_main]

use std::path::Path;

use hookbridge::config::Env;
use hookbridge::route::RouteTable;
use libfuzzer_sys::fuzz_target;
use toml::de::{DeTable, DeValue};

/// No variable is set.
struct NoEnv;

impl Env for NoEnv {
    fn var(&self, _: &str) -> Option<String> {
        None
    }
}

/// True when some key or string in the document could make `parse` touch something real.
fn risky(table: &DeTable<'_>) -> bool {
    table.iter().any(|(k, v)| risky_str(k.get_ref()) || risky_value(v.get_ref()))
}

fn risky_value(v: &DeValue<'_>) -> bool {
    match v {
        DeValue::String(s) => risky_str(s),
        DeValue::Array(a) => a.iter().any(|v| risky_value(v.get_ref())),
        DeValue::Table(t) => risky(t),
        _ => false,
    }
}

fn risky_str(s: &str) -> bool {
    s.contains("plugin.library.paths") || (s.starts_with('/') && Path::new(s).exists())
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (root, syntax) = DeTable::parse_recoverable(text);
    if syntax.is_empty() && risky(root.get_ref()) {
        return;
    }
    match hookbridge::Config::parse(text, None, Path::new("/nonexistent-fuzz-base"), &NoEnv) {
        // What validation accepted compiles again (the bridge does so).
        Ok(config) => assert!(RouteTable::compile(&config.routes).is_ok()),
        // Every report renders.
        Err(errors) => {
            assert!(!errors.errors.is_empty());
            let _ = errors.to_string();
        }
    }
});
