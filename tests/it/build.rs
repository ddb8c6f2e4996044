//! Release builds are profile-guided: cargo runs rustc through `scripts/rustc-wrapper`, which
//! adds the committed profile to optimised builds only (BENCHMARKS.md, "Profile-guided
//! builds"). Here the wrapper runs `echo` in rustc's place, so its arguments come back.

use std::process::Command;

use crate::support::repo;

/// What the wrapper would run rustc with, given these arguments and environment.
fn wrapped(args: &[&str], env: &[(&str, &str)]) -> String {
    let output = Command::new(repo("scripts/rustc-wrapper"))
        .arg("echo")
        .args(args)
        .env_remove("KEG_PGO")
        .envs(env.iter().copied())
        .output()
        .expect("the wrapper runs");
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout)
        .unwrap()
        .trim_end()
        .to_owned()
}

#[test]
fn optimised_builds_use_the_committed_profile_and_others_run_unchanged() {
    let profile = repo("pgo/keg.profdata");
    assert!(profile.is_file(), "{} is committed", profile.display());
    let config = std::fs::read_to_string(repo(".cargo/config.toml")).unwrap();
    assert!(
        config.contains("rustc-wrapper = \"scripts/rustc-wrapper\""),
        "{config}"
    );

    let release = ["--crate-name", "keg", "-C", "opt-level=3", "-C", "lto=fat"];
    assert_eq!(
        wrapped(&release, &[]),
        format!(
            "--crate-name keg -C opt-level=3 -C lto=fat -Cprofile-use={} \
             -Cllvm-args=-no-pgo-warn-mismatch",
            profile.canonicalize().unwrap().display()
        )
    );
    // Debug builds, build scripts and proc macros (opt-level 0), and cargo's probes.
    for args in [
        &["--crate-name", "keg", "-C", "opt-level=0"][..],
        &["--crate-name", "build_script_build"][..],
        &["-vV"][..],
    ] {
        assert_eq!(wrapped(args, &[]), args.join(" "));
    }
    // A build that makes a profile cannot use one; and the switch to build without.
    let generate = ["-C", "opt-level=3", "-C", "profile-generate=/tmp/raw"];
    assert_eq!(wrapped(&generate, &[]), generate.join(" "));
    assert_eq!(wrapped(&release, &[("KEG_PGO", "0")]), release.join(" "));
}
