//! Field-level validation errors shared by every input type.

use std::fmt;

/// One problem with one field, named by its path (`spec.replicas`, `metadata.name`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path of the field, as a user would write it.
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

/// Every problem found in one input, reported together.
#[derive(Debug, Clone, Default, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl ValidationErrors {
    /// Records a problem with `field`.
    pub fn push(&mut self, field: impl Into<String>, problem: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            problem: problem.into(),
        });
    }

    /// `Ok(())` when nothing was recorded.
    pub fn into_result(self) -> Result<(), ValidationErrors> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self)
        }
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", e.field, e.problem)?;
        }
        Ok(())
    }
}

/// Checks an RFC 1123 DNS label: 1-63 lowercase alphanumerics or '-', starting
/// and ending alphanumeric.
pub(crate) fn check_dns_label(errs: &mut ValidationErrors, field: &str, value: &str) {
    if value.is_empty() {
        errs.push(field, "must not be empty");
        return;
    }
    if value.len() > 63 {
        errs.push(
            field,
            format!("is {} characters long, at most 63 are allowed", value.len()),
        );
    }
    let ok_chars = value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let ends_ok = !value.starts_with('-') && !value.ends_with('-');
    if !ok_chars || !ends_ok {
        errs.push(
            field,
            format!("{value:?} must be lowercase letters, digits and '-', starting and ending with a letter or digit"),
        );
    }
}

/// Checks a label map: keys up to 253 bytes of `[A-Za-z0-9._/-]`, values up to 253 bytes.
pub fn check_labels<'a>(
    errs: &mut ValidationErrors,
    field: &str,
    labels: impl IntoIterator<Item = (&'a String, &'a String)>,
) {
    for (k, v) in labels {
        let ok = !k.is_empty()
            && k.len() <= 253
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-'));
        if !ok {
            errs.push(
                format!("{field}.{k}"),
                "label keys must be 1-253 characters of letters, digits, '.', '_', '/' or '-'",
            );
        }
        if v.len() > 253 {
            errs.push(
                format!("{field}.{k}"),
                "label values must be at most 253 characters",
            );
        }
    }
}

/// Parses `90`, `90s`, `30m`, `1h` or `7d` into seconds (0 allowed).
pub fn parse_duration_secs(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 30m, 1h or 7d"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => return Err(format!("unknown unit {other:?} in {s:?}; use s, m, h or d")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too long"))
}
