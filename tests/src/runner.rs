//! The check runner both conformance suites share: a [`Check`] of some [`Subject`] (a storage
//! backend, a transport), run in its own task with [`CHECK_TIMEOUT`] and a seed, its panic or
//! hang turned into a [`Failure`] that names the subject, the check and the seed.
//!
//! # Seeds
//!
//! Randomised checks draw everything from one `u64`. [`seed`] reads it from the `CHORUS_SEED`
//! environment variable ([`SEED_ENV`]; decimal or `0x` hex) and otherwise uses
//! [`DEFAULT_SEED`], so every run checks the same histories and a failure never depends on
//! luck. A failure report says `rerun with CHORUS_SEED=<seed>`.

use std::any::Any;
use std::fmt;
use std::time::Duration;

use chorus::util::BoxFuture;

/// Environment variable that fixes the seed of the randomised checks.
pub const SEED_ENV: &str = "CHORUS_SEED";

/// The seed used when [`SEED_ENV`] is not set, so every run (CI included) checks the same
/// histories. Set [`SEED_ENV`] to explore others.
pub const DEFAULT_SEED: u64 = 0xC0FF_EE00_2026_1122;

/// How long one check may run before it counts as hung.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(60);

/// The seed for randomised checks: [`SEED_ENV`] if set, otherwise [`DEFAULT_SEED`].
///
/// # Panics
///
/// If [`SEED_ENV`] is set but is not a decimal or `0x`-prefixed hexadecimal `u64`.
pub fn seed() -> u64 {
    match std::env::var(SEED_ENV) {
        Ok(text) => parse_seed(&text)
            .unwrap_or_else(|| panic!("{SEED_ENV}={text:?} is not a decimal or 0x-hex u64")),
        Err(_) => DEFAULT_SEED,
    }
}

fn parse_seed(text: &str) -> Option<u64> {
    let text = text.trim();
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// What a suite checks: cheap to clone into a check's task, and named in reports.
pub trait Subject: Clone + Send + 'static {
    /// What kind of thing it is, in reports (`"backend"`, `"transport"`).
    const KIND: &'static str;

    /// Its name in reports.
    fn name(&self) -> &str;
}

/// One conformance check of a `S`: a name, what it covers, how to run it, and when it does
/// not apply.
pub struct Check<S> {
    /// Short name used in reports.
    pub name: &'static str,
    /// What the check verifies.
    pub description: &'static str,
    run: fn(S, u64) -> BoxFuture<'static, ()>,
    skip: fn(&S) -> Option<String>,
}

// Derives would require `S: Clone`; a check only holds function pointers.
impl<S> Clone for Check<S> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<S> Copy for Check<S> {}

impl<S> fmt::Debug for Check<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Check")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn applies_always<S>(_: &S) -> Option<String> {
    None
}

impl<S> Check<S> {
    /// A check that runs `run` with the subject and the seed; it panics on a violation.
    pub const fn new(
        name: &'static str,
        description: &'static str,
        run: fn(S, u64) -> BoxFuture<'static, ()>,
    ) -> Self {
        Check {
            name,
            description,
            run,
            skip: applies_always::<S>,
        }
    }

    /// The same check, skipped for a subject where `skip` gives a reason.
    pub const fn skip_when(mut self, skip: fn(&S) -> Option<String>) -> Self {
        self.skip = skip;
        self
    }

    /// Why the check does not apply to `subject`, if it does not.
    pub fn skip_reason(&self, subject: &S) -> Option<String> {
        (self.skip)(subject)
    }
}

/// How a check that did not fail ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ran {
    /// It ran and found nothing wrong.
    Passed,
    /// It does not apply to the subject, for this reason; nothing was checked.
    Skipped(String),
}

/// A check that failed on a subject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// What kind of subject ([`Subject::KIND`]).
    pub kind: &'static str,
    /// Name of the subject.
    pub subject: String,
    /// Name of the check.
    pub check: &'static str,
    /// Seed the check ran with.
    pub seed: u64,
    /// The panic message, or why the check did not finish.
    pub message: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:?} failed conformance check {:?} (seed {}; rerun with {SEED_ENV}={}): {}",
            self.kind, self.subject, self.check, self.seed, self.seed, self.message
        )
    }
}

/// Runs `check` against `subject` in its own Tokio task, with [`CHECK_TIMEOUT`], unless it
/// does not apply. The check's panic (its assertion message) or its hang becomes a
/// [`Failure`].
///
/// Spawns onto the current runtime and uses its timer: run it inside a multi-threaded runtime
/// with time enabled, so that checks with concurrent tasks really run them in parallel.
pub async fn run_check<S: Subject>(
    subject: &S,
    check: &Check<S>,
    seed: u64,
) -> Result<Ran, Failure> {
    if let Some(reason) = check.skip_reason(subject) {
        return Ok(Ran::Skipped(reason));
    }
    let task = tokio::spawn((check.run)(subject.clone(), seed));
    let message = match tokio::time::timeout(CHECK_TIMEOUT, task).await {
        Ok(Ok(())) => return Ok(Ran::Passed),
        Ok(Err(join)) => match join.try_into_panic() {
            Ok(payload) => panic_message(payload.as_ref()),
            Err(join) => format!("the check's task failed: {join}"),
        },
        Err(_) => format!("did not finish within {CHECK_TIMEOUT:?}"),
    };
    Err(Failure {
        kind: S::KIND,
        subject: subject.name().to_owned(),
        check: check.name,
        seed,
        message,
    })
}

/// Runs every check of `checks` against `subject`; returns the failures.
pub async fn run_all<S: Subject>(subject: &S, checks: &[Check<S>], seed: u64) -> Vec<Failure> {
    let mut failures = Vec::new();
    for check in checks {
        if let Err(failure) = run_check(subject, check, seed).await {
            failures.push(failure);
        }
    }
    failures
}

/// The text of a panic payload.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else if let Some(text) = payload.downcast_ref::<&'static str>() {
        (*text).to_owned()
    } else {
        "the check panicked with a non-text payload".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_parse_in_decimal_and_hex() {
        assert_eq!(parse_seed("42"), Some(42));
        assert_eq!(parse_seed(" 0x2A "), Some(42));
        assert_eq!(parse_seed("0Xff"), Some(255));
        assert_eq!(parse_seed("forty-two"), None);
        assert_eq!(parse_seed("-1"), None);
    }

    #[derive(Clone)]
    struct Named(&'static str);

    impl Subject for Named {
        const KIND: &'static str = "thing";
        fn name(&self) -> &str {
            self.0
        }
    }

    const PASSES: Check<Named> = Check::new("passes", "does nothing", |_, _| Box::pin(async {}));
    const FAILS: Check<Named> = Check::new("fails", "panics with the seed", |_, seed| {
        Box::pin(async move { panic!("bad at {seed}") })
    });
    const SKIPS: Check<Named> = FAILS.skip_when(|named| Some(format!("{} is exempt", named.0)));

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn outcomes_name_the_subject_the_check_and_the_seed() {
        let subject = Named("x");
        assert_eq!(run_check(&subject, &PASSES, 7).await, Ok(Ran::Passed));
        assert_eq!(
            run_check(&subject, &SKIPS, 7).await,
            Ok(Ran::Skipped("x is exempt".to_owned()))
        );
        let failures = run_all(&subject, &[PASSES, FAILS, SKIPS], 7).await;
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert_eq!(
            failures[0].to_string(),
            "thing \"x\" failed conformance check \"fails\" (seed 7; rerun with CHORUS_SEED=7): \
             bad at 7"
        );
    }
}
