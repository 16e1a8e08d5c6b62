// SPDX-License-Identifier: Apache-2.0
//! Renderings of a [`Report`]: readable text, JUnit XML and JSON.
//!
//! * [`text`]: one line per test (`PASS|FAIL|SKIP <kind>/<category>/<name> (1.2s)`), failures
//!   with their reason and RPC exchange indented below, then the verdict, and the summary line
//!   `N passed, N failed, N skipped` as the very last line.
//! * [`junit`]: one `<testsuite name="iri-conformance.<kind>">` inside `<testsuites>`, a
//!   `<testcase classname="<kind>.<category>" name="<name>">` per test with `<failure>` or
//!   `<skipped>`, in the dialect Jenkins, GitLab and `junitparser` read.
//! * [`json`]: the serialized report plus the counts, the summary line and the verdict.

use std::{
    fmt::Write as _,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::harness::{Exchange, Outcome, Report, TestReport};

/// The readable report.
pub fn text(report: &Report) -> String {
    let mut out = String::new();
    let profiles: Vec<&str> = report.profiles.iter().map(|p| p.name()).collect();
    let _ = writeln!(
        out,
        "iri-conformance {} at {} ({}), profiles: {}",
        report.kind,
        report.endpoint,
        report.runtime,
        profiles.join(", ")
    );
    for test in &report.tests {
        let _ = writeln!(out, "{}", test_line(test));
        match &test.outcome {
            Outcome::Passed => {}
            Outcome::Failed(failure) => {
                indent(&mut out, 4, &format!("reason: {}", failure.reason));
                if !failure.exchange.is_empty() {
                    indent(&mut out, 4, "exchange (the failing call last):");
                    for exchange in &failure.exchange {
                        indent(&mut out, 6, &exchange_text(exchange));
                    }
                }
            }
            Outcome::Skipped { reason } => indent(&mut out, 4, reason),
        }
    }
    let _ = writeln!(out, "Verdict: {}", report.verdict());
    let _ = writeln!(out, "{}", report.summary_line());
    out
}

/// `PASS machine/lifecycle/create_list_delete (1.2s)`.
pub fn test_line(test: &TestReport) -> String {
    let status = match test.outcome {
        Outcome::Passed => "PASS",
        Outcome::Failed(_) => "FAIL",
        Outcome::Skipped { .. } => "SKIP",
    };
    format!("{status} {} ({:.1}s)", test.name, test.duration.as_secs_f64())
}

fn exchange_text(exchange: &Exchange) -> String {
    format!(
        "{}\n  request:  {}\n  response: {}",
        exchange.method, exchange.request, exchange.response
    )
}

/// Appends `text` with every line indented by `by` spaces.
fn indent(out: &mut String, by: usize, text: &str) {
    for line in text.lines() {
        let _ = writeln!(out, "{:by$}{line}", "");
    }
}

/// The JUnit XML report, timestamped with the run's start (now minus its duration).
pub fn junit(report: &Report) -> String {
    let started = SystemTime::now()
        .checked_sub(report.duration)
        .unwrap_or(UNIX_EPOCH);
    junit_at(report, started)
}

/// The JUnit XML report of a run that started at `started`.
pub fn junit_at(report: &Report, started: SystemTime) -> String {
    let (tests, failures, skipped) = (report.tests.len(), report.failed(), report.skipped());
    let time = seconds(report.duration);
    let suite = format!("iri-conformance.{}", report.kind);
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        out,
        r#"<testsuites name="iri-conformance" tests="{tests}" failures="{failures}" errors="0" skipped="{skipped}" time="{time}">"#
    );
    let _ = writeln!(
        out,
        r#"  <testsuite name="{}" tests="{tests}" failures="{failures}" errors="0" skipped="{skipped}" time="{time}" timestamp="{}">"#,
        escape(&suite),
        iso8601(started)
    );
    let profiles: Vec<&str> = report.profiles.iter().map(|p| p.name()).collect();
    out.push_str("    <properties>\n");
    for (name, value) in [
        ("endpoint", report.endpoint.clone()),
        ("runtime", report.runtime.clone()),
        ("profiles", profiles.join(",")),
        ("verdict", report.verdict()),
        ("summary", report.summary_line()),
    ] {
        let _ = writeln!(
            out,
            r#"      <property name="{name}" value="{}"/>"#,
            escape(&value)
        );
    }
    out.push_str("    </properties>\n");
    for test in &report.tests {
        let (classname, name) = junit_names(report, test);
        let _ = write!(
            out,
            r#"    <testcase classname="{}" name="{}" time="{}""#,
            escape(&classname),
            escape(&name),
            seconds(test.duration)
        );
        match &test.outcome {
            Outcome::Passed => out.push_str("/>\n"),
            Outcome::Failed(failure) => {
                let body: Vec<String> = failure.exchange.iter().map(exchange_text).collect();
                let _ = writeln!(
                    out,
                    ">\n      <failure message=\"{}\" type=\"failure\">{}</failure>\n    </testcase>",
                    escape(&failure.reason),
                    escape(&format!("{}\n\n{}", failure.reason, body.join("\n")))
                );
            }
            Outcome::Skipped { reason } => {
                let _ = writeln!(
                    out,
                    ">\n      <skipped message=\"{}\"/>\n    </testcase>",
                    escape(reason)
                );
            }
        }
    }
    out.push_str("  </testsuite>\n</testsuites>\n");
    out
}

/// `("machine.lifecycle", "create_list_delete")` from `machine/lifecycle/create_list_delete`.
fn junit_names(report: &Report, test: &TestReport) -> (String, String) {
    let category = test.category.name();
    let prefix = format!("{}/{category}/", report.kind);
    let name = test.name.strip_prefix(&prefix).unwrap_or(&test.name);
    (format!("{}.{category}", report.kind), name.to_string())
}

/// Escapes text for XML 1.0 content and attribute values alike. Characters XML 1.0 cannot carry
/// at all (most C0 controls, U+FFFE, U+FFFF) become a visible `\u{..}` so reports of runtimes
/// sending binary garbage still parse; tabs and line breaks become character references so
/// attribute normalization keeps them.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            '\t' => out.push_str("&#9;"),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

fn seconds(duration: Duration) -> String {
    format!("{:.3}", duration.as_secs_f64())
}

/// `2026-08-21T12:34:56Z`: UTC, second precision, as JUnit's `timestamp` wants it.
fn iso8601(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// The JSON report: the serialized [`Report`] plus `passed`, `failed`, `skipped`, `summary`
/// (the summary line), `verdict` and `passed_profiles`, so consumers need not recount.
pub fn json(report: &Report) -> String {
    let mut value = serde_json::to_value(report).expect("a report always serializes");
    if let Some(object) = value.as_object_mut() {
        object.insert("passed".into(), report.passed().into());
        object.insert("failed".into(), report.failed().into());
        object.insert("skipped".into(), report.skipped().into());
        object.insert("summary".into(), report.summary_line().into());
        object.insert("verdict".into(), report.verdict().into());
        let passed: Vec<&str> = report.passed_profiles().iter().map(|p| p.name()).collect();
        object.insert("passed_profiles".into(), passed.into());
    }
    let mut text = serde_json::to_string_pretty(&value).expect("a JSON value always serializes");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::{Category, Failure, Profile};

    fn sample() -> Report {
        let test = |name: &str, category: Category, profile: Profile, outcome: Outcome| TestReport {
            name: format!("machine/{}/{name}", category.name()),
            category,
            profile,
            summary: "does a thing".into(),
            outcome,
            duration: Duration::from_millis(1234),
        };
        Report {
            kind: "machine".into(),
            endpoint: "unix:///run/m.sock".into(),
            runtime: "ref 1.0.0".into(),
            profiles: vec![Profile::Core, Profile::Exec],
            tests: vec![
                test("version", Category::Identity, Profile::Core, Outcome::Passed),
                test(
                    "exec_opens",
                    Category::Exec,
                    Profile::Exec,
                    Outcome::Failed(Failure {
                        reason: "stream <closed> & \"gone\"\nsecond line \u{1}".into(),
                        exchange: vec![Exchange {
                            method: "exec".into(),
                            request: "ExecRequest { machine_id: \"a\" }".into(),
                            response: "Unavailable: ]]> nope".into(),
                        }],
                    }),
                ),
                test(
                    "restart",
                    Category::Restart,
                    Profile::Restart,
                    Outcome::Skipped {
                        reason: "profile restart not selected".into(),
                    },
                ),
            ],
            duration: Duration::from_secs(3),
        }
    }

    #[test]
    fn text_ends_with_the_summary_line() {
        let text = text(&sample());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.last(), Some(&"1 passed, 1 failed, 1 skipped"));
        assert_eq!(lines[lines.len() - 2], "Verdict: passes core; fails exec");
        assert!(lines.contains(&"PASS machine/identity/version (1.2s)"));
        assert!(lines.contains(&"FAIL machine/exec/exec_opens (1.2s)"));
        assert!(lines.contains(&"    reason: stream <closed> & \"gone\""));
        assert!(lines.contains(&"      exec"));
        assert!(lines.contains(&"        response: Unavailable: ]]> nope"));
        assert!(lines.contains(&"SKIP machine/restart/restart (1.2s)"));
        assert!(lines.contains(&"    profile restart not selected"));
    }

    #[test]
    fn escape_handles_markup_and_control_characters() {
        assert_eq!(escape("a<b>&\"'"), "a&lt;b&gt;&amp;&quot;&apos;");
        assert_eq!(escape("x\ny\tz\r"), "x&#10;y&#9;z&#13;");
        assert_eq!(escape("\u{0}\u{1b}\u{FFFF}ü"), "\\u{0}\\u{1b}\\u{ffff}ü");
    }

    #[test]
    fn junit_has_the_expected_shape() {
        let xml = junit_at(&sample(), UNIX_EPOCH + Duration::from_secs(1_787_400_000));
        assert!(xml.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites "));
        assert!(xml.contains(r#"<testsuite name="iri-conformance.machine" tests="3" failures="1" errors="0" skipped="1" time="3.000" timestamp="2026-08-22T12:00:00Z">"#), "{xml}");
        assert!(xml.contains(r#"<testcase classname="machine.identity" name="version" time="1.234"/>"#));
        assert!(xml.contains(r#"<skipped message="profile restart not selected"/>"#));
        assert!(xml.contains(
            "<failure message=\"stream &lt;closed&gt; &amp; &quot;gone&quot;&#10;second line \\u{1}\""
        ));
        assert!(!xml.contains('\u{1}'));
    }

    #[test]
    fn iso8601_dates() {
        assert_eq!(iso8601(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            iso8601(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
        assert_eq!(
            iso8601(UNIX_EPOCH + Duration::from_secs(1_709_251_199)),
            "2024-02-29T23:59:59Z"
        );
    }

    #[test]
    fn json_carries_counts_and_verdict() {
        let value: serde_json::Value = serde_json::from_str(&json(&sample())).unwrap();
        assert_eq!(value["passed"], 1);
        assert_eq!(value["failed"], 1);
        assert_eq!(value["skipped"], 1);
        assert_eq!(value["summary"], "1 passed, 1 failed, 1 skipped");
        assert_eq!(value["verdict"], "passes core; fails exec");
        assert_eq!(value["tests"][1]["outcome"], "failed");
        assert_eq!(value["tests"][1]["exchange"][0]["method"], "exec");
    }
}
