//! What a test run ran, counted per test binary from its output: the binary a line belongs to
//! (cargo's `Running …` line, or vmtest's `vmtest: running NAME`), its `test result:` line, and
//! how it exited (`vmtest: exit NAME CODE`, or cargo's list of failed targets). A binary that
//! printed no result line crashed or never started; a run that ran no test at all is an error,
//! not a pass.

use std::fmt::Write as _;

/// One test binary's outcome.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Binary {
    pub name: String,
    pub passed: u64,
    pub failed: u64,
    /// A `test result:` line was seen.
    pub finished: bool,
    /// Its exit status, where the runner reports it (vmtest; cargo only names failed targets).
    pub exit: Option<i32>,
}

impl Binary {
    /// Whether this binary's run was good: it finished, nothing failed, it exited 0 if known.
    #[must_use]
    pub fn ok(&self) -> bool {
        self.finished && self.failed == 0 && self.exit.is_none_or(|code| code == 0)
    }
}

#[derive(Debug, Default)]
pub struct Tally {
    pub binaries: Vec<Binary>,
}

impl Tally {
    /// Takes one line of the run's output.
    pub fn line(&mut self, line: &str) {
        let line = line.trim_end();
        if let Some(name) = running_name(line) {
            self.binaries.push(Binary {
                name,
                ..Binary::default()
            });
        } else if let Some(result) = line.strip_prefix("test result: ") {
            if self.binaries.is_empty() {
                // A result whose binary was not named still counts.
                self.binaries.push(Binary {
                    name: "(unnamed)".into(),
                    ..Binary::default()
                });
            }
            if let Some(b) = self.binaries.last_mut() {
                b.passed += count_before(result, " passed");
                b.failed += count_before(result, " failed");
                b.finished = true;
            }
        } else if let Some(rest) = line.strip_prefix("vmtest: exit ") {
            let mut words = rest.split_whitespace();
            if let (Some(name), Some(code)) = (words.next(), words.next().and_then(|c| c.parse().ok()))
                && let Some(b) = self.binaries.iter_mut().rev().find(|b| b.name == name)
            {
                b.exit = Some(code);
            }
        }
    }

    #[must_use]
    pub fn passed(&self) -> u64 {
        self.binaries.iter().map(|b| b.passed).sum()
    }

    #[must_use]
    pub fn failed(&self) -> u64 {
        self.binaries.iter().map(|b| b.failed).sum()
    }

    /// The closing lines: a FAILED line naming each bad binary, then `N passed, N failed`.
    /// `Err` carries the same text when anything was bad or no test ran at all;
    /// `each_binary_must_pass` also requires at least one passed test of every binary (vmtest
    /// names its tests exactly: a renamed one would run nothing).
    pub fn verdict(&self, each_binary_must_pass: bool) -> Result<String, String> {
        let mut out = String::new();
        let mut bad = false;
        for b in &self.binaries {
            let empty = each_binary_must_pass && b.passed == 0;
            if b.ok() && !empty {
                continue;
            }
            bad = true;
            let why = if !b.finished {
                "printed no result (crashed, killed or did not start)".to_owned()
            } else if b.failed > 0 {
                format!("{} failed", b.failed)
            } else if let Some(code) = b.exit.filter(|c| *c != 0) {
                format!("exited with status {code}")
            } else {
                "ran no test".to_owned()
            };
            let _ = writeln!(out, "FAILED: {}: {why}", b.name);
        }
        if self.passed() + self.failed() == 0 {
            bad = true;
            let _ = writeln!(out, "FAILED: no test ran");
        }
        let _ = write!(out, "{} passed, {} failed", self.passed(), self.failed());
        if bad { Err(out) } else { Ok(out) }
    }
}

impl Tally {
    /// Prints the closing lines and fails when the run was not good.
    pub fn report(&self, each_binary_must_pass: bool) -> anyhow::Result<()> {
        match self.verdict(each_binary_must_pass) {
            Ok(summary) => {
                println!("{summary}");
                Ok(())
            }
            Err(summary) => {
                println!("{summary}");
                anyhow::bail!("the test run is not good (see FAILED above)")
            }
        }
    }
}

/// The binary a `Running` line starts: `unittests src/lib.rs (target/debug/deps/NAME-HASH)`,
/// `tests/e2e.rs (target/debug/deps/e2e-HASH)`, or vmtest's `vmtest: running NAME`.
fn running_name(line: &str) -> Option<String> {
    if let Some(name) = line.strip_prefix("vmtest: running ") {
        return Some(name.trim().to_owned());
    }
    if let Some(name) = line.trim_start().strip_prefix("Doc-tests ") {
        return Some(format!("doc-tests {}", name.trim()));
    }
    let rest = line.trim_start().strip_prefix("Running ")?;
    let path = rest
        .rsplit_once('(')
        .map_or(rest, |(_, p)| p.trim_end_matches(')'));
    let file = path.rsplit('/').next().unwrap_or(path);
    Some(file.rsplit_once('-').map_or(file, |(n, _)| n).to_owned())
}

/// In "ok. 12 passed; 0 failed; ...", the number before `label`.
pub fn count_before(result: &str, label: &str) -> u64 {
    result
        .split(';')
        .find_map(|part| {
            part.trim()
                .trim_start_matches("ok. ")
                .trim_start_matches("FAILED. ")
                .strip_suffix(label.trim_start())
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tally(lines: &[&str]) -> Tally {
        let mut t = Tally::default();
        for l in lines {
            t.line(l);
        }
        t
    }

    #[test]
    fn a_good_run_counts_every_binary() {
        let t = tally(&[
            "     Running unittests src/lib.rs (target/debug/deps/portmap-1234abcd)",
            "test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out",
            "     Running tests/e2e.rs (target/debug/deps/e2e-99)",
            "test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 5 filtered out",
        ]);
        assert_eq!(t.binaries[0].name, "portmap");
        assert_eq!(t.verdict(false), Ok("3 passed, 0 failed".into()));
    }

    #[test]
    fn a_crashed_binary_fails_the_run_by_name() {
        let t = tally(&[
            "     Running tests/e2e.rs (target/debug/deps/e2e-99)",
            "test lifecycle ... ",
            "     Running tests/cni.rs (target/debug/deps/cni-1)",
            "test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out",
        ]);
        let err = t.verdict(false).unwrap_err();
        assert!(err.contains("FAILED: e2e: printed no result"), "{err}");
        assert!(err.ends_with("2 passed, 0 failed"), "{err}");
    }

    #[test]
    fn no_test_at_all_is_an_error() {
        let t = tally(&[
            "     Running tests/e2e.rs (target/debug/deps/e2e-99)",
            "test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 17 filtered out",
        ]);
        assert!(t.verdict(false).unwrap_err().contains("FAILED: no test ran"));
    }

    #[test]
    fn vmtest_requires_exit_zero_and_a_passed_test_of_every_binary() {
        let t = tally(&[
            "vmtest: running golden",
            "test result: ok. 5 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out",
            "vmtest: exit golden 101",
            "vmtest: running e2e",
            "test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out",
            "vmtest: exit e2e 0",
        ]);
        let err = t.verdict(true).unwrap_err();
        assert!(err.contains("FAILED: golden: exited with status 101"), "{err}");
        assert!(err.contains("FAILED: e2e: ran no test"), "{err}");
        let t = tally(&[
            "vmtest: running golden",
            "test result: ok. 5 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out",
            "vmtest: exit golden 0",
        ]);
        assert_eq!(t.verdict(true), Ok("5 passed, 0 failed".into()));
    }

    #[test]
    fn counts_from_test_result_lines() {
        let ok = "ok. 12 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 5.64s";
        assert_eq!(
            (count_before(ok, " passed"), count_before(ok, " failed")),
            (12, 0)
        );
        let bad = "FAILED. 3 passed; 1 failed; 0 ignored; 0 measured; 9 filtered out; finished in 1.0s";
        assert_eq!(
            (count_before(bad, " passed"), count_before(bad, " failed")),
            (3, 1)
        );
    }
}
