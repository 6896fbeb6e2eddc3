//! `hookbridge check`: every shipped example config passes; broken configs are reported with file, line
//! and key, all problems at once (golden files in `tests/golden/`).

use std::path::Path;
use std::process::Command;

use crate::common::binary;

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

#[test]
fn every_shipped_config_passes_check() {
    // The systemd example reads its secret as a credential.
    let credentials = tempfile::tempdir().unwrap();
    std::fs::write(credentials.path().join("clockify-webhook-secret"), "example-credential\n").unwrap();
    std::fs::write(
        credentials.path().join("hookbridge-database-url"),
        "postgres://hookbridge:example@db.internal.example:5432/hookbridge\n",
    )
    .unwrap();
    let mut checked = 0;
    for entry in std::fs::read_dir(repo().join("config")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        // The examples read secrets from the environment, as a unit file or shell would provide them.
        let out = Command::new(binary())
            .args(["check", "--config"])
            .arg(&path)
            .env("CLOCKIFY_WEBHOOK_SECRET", "example-clockify-secret")
            .env("TIMESHEETS_TOKEN", "example-token")
            .env("HOOKBRIDGE_ADMIN_TOKEN", "example-admin-token-0123456789")
            .env("CLOCKODO_WEBHOOK_TOKEN", "example-clockodo-token")
            .env("GITHUB_WEBHOOK_SECRET", "example-github-secret")
            .env("CLOCKIFY_HMAC_SECRET", "example-hmac-secret")
            .env("HOOKBRIDGE_AMQP_URL", "amqp://hookbridge:example@rabbitmq.internal.example:5672/%2f")
            .env("STANDARD_WEBHOOK_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .env("CREDENTIALS_DIRECTORY", credentials.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}: {stdout}{}", path.display(), String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains(": ok ("), "{stdout}");
        checked += 1;
    }
    assert!(checked >= 4, "expected the example configs, found {checked}");
}

#[test]
fn broken_configs_match_their_golden_reports() {
    let golden = repo().join("tests/golden");
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut checked = 0;
    for entry in std::fs::read_dir(&golden).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        let out = Command::new(binary())
            .current_dir(&golden)
            .args(["check", "--config", &name])
            .env_remove("HOOKBRIDGE_GOLDEN_UNSET_VARIABLE")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{name}: check must fail");
        let actual = String::from_utf8(out.stdout).unwrap();
        let expected_path = path.with_extension("expected");
        if update {
            std::fs::write(&expected_path, &actual).unwrap();
        }
        let expected = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|_| panic!("{} missing: run with UPDATE_GOLDEN=1", expected_path.display()));
        assert_eq!(actual, expected, "{name}: report differs from its golden file");
        for line in actual.lines() {
            assert!(line.starts_with(&format!("{name}:")), "every line names the file: {line}");
            assert!(!line.contains("hunter2"), "a secret reached check's output: {line}");
        }
        checked += 1;
    }
    assert_eq!(checked, 10);
}
