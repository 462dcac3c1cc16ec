//! How `cloudlessctl` prints: the `-o` format, the JSON and YAML writer,
//! and the small text helpers of the tables (ages, expiries, sanitising).
//!
//! The format is passed explicitly (in [`crate::cmd::Ctx`]); there is no
//! process-wide state.

use clap::ValueEnum;

use crate::client::Failure;
use crate::Exit;

/// The output format chosen with `-o`.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(crate) enum Output {
    Table,
    Json,
    Yaml,
    /// A table with more columns where a command has them (`get replicas`:
    /// ADDRESS; `get nodes`: SUBNET; `get services`: ALLOW-FROM, INGRESS),
    /// else the table.
    Wide,
}

impl Output {
    /// JSON or YAML was asked for (not a table).
    pub(crate) fn is_structured(self) -> bool {
        matches!(self, Output::Json | Output::Yaml)
    }

    /// The wide table was asked for.
    pub(crate) fn is_wide(self) -> bool {
        self == Output::Wide
    }

    /// Prints `v` as YAML with `-o yaml`, else as JSON (commands that have no
    /// table print JSON with `-o table` too).
    pub(crate) fn print<T: serde::Serialize>(self, v: &T) -> Result<(), Failure> {
        print!("{}", self.render(v)?);
        Ok(())
    }

    /// The text [`Output::print`] prints: YAML with `-o yaml`, else pretty
    /// JSON and a newline.
    fn render<T: serde::Serialize>(self, v: &T) -> Result<String, Failure> {
        if self == Output::Yaml {
            serde_yaml_ng::to_string(v)
                .map_err(|e| Failure::new(Exit::Failed, anyhow::anyhow!("cannot write YAML: {e}")))
        } else {
            Ok(format!("{}\n", serde_json::to_string_pretty(v)?))
        }
    }
}

/// A time in Unix milliseconds relative to now: "in 5m", "3h ago".
pub(crate) fn fmt_ms(ms: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let secs = (ms - now) / 1000;
    if secs >= 0 {
        format!("in {}", human(secs))
    } else {
        format!("{} ago", human(-secs))
    }
}

/// A duration in seconds, coarsely: 90s, 5m, 3h, 2d.
pub(crate) fn human(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// Unix milliseconds now.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Replaces control characters (terminal escapes) in text from the cluster
/// before it is printed.
pub(crate) fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structured_output_is_yaml_only_when_asked_for() {
        let v = serde_json::json!({ "name": "web", "replicas": 2 });
        let json = "{\n  \"name\": \"web\",\n  \"replicas\": 2\n}\n";
        for format in [Output::Table, Output::Json] {
            assert_eq!(format.render(&v).ok().as_deref(), Some(json), "{format:?}");
        }
        assert_eq!(
            Output::Yaml.render(&v).ok().as_deref(),
            Some("name: web\nreplicas: 2\n")
        );
        assert!(!Output::Table.is_structured());
        assert!(Output::Json.is_structured() && Output::Yaml.is_structured());
    }

    #[test]
    fn ages_are_coarse_and_escapes_are_replaced() {
        assert_eq!(human(119), "119s");
        assert_eq!(human(120), "2m");
        assert_eq!(human(7200), "2h");
        assert_eq!(human(172_800), "2d");
        assert_eq!(sanitize("ok\u{1b}[31m\n"), "ok?[31m?");
    }
}
