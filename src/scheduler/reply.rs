//! The reply SSGM prints on stdout for `-alloc`, parsed into an [`AllocReply`].
//!
//! This module owns the reading of that one line and nothing else: it runs no
//! process and takes no tokio type, so it is tested on plain strings. Running
//! SSGM and deciding what a reply means for a job belong to [`super::ssgm`] and
//! the job pipeline.
//!
//! # The format, and what is tolerated
//!
//! No public sample of a real reply exists, so the parser follows the contract
//! in DESIGN.md §3.1 and reads fields by position while keeping their names:
//!
//! ```text
//! SSGM_ERROR=0;SSGM_JOB=42;RCUDA_DEVICE_COUNT=2;RCUDA_DEVICE_0=gpu1:0;RCUDA_DEVICE_1=gpu2:1;
//! ```
//!
//! - Field 0 must be named `SSGM_ERROR`: `0` granted, `1` request error, `2` busy.
//! - Field 1 of a granted reply is the scheduler's job id, whatever its name.
//! - Fields 2.. of a granted reply are the rCUDA client settings, kept in order.
//!   A granted reply with no settings is accepted (the settings are empty): the
//!   job id alone is enough to release the GPUs, and whether a job can run
//!   without settings is the job's decision, not the parser's.
//! - A busy or request-error reply needs nothing after field 0. Whatever
//!   follows is not interpreted, so a free-text message that itself contains
//!   `;` cannot turn a clear "no" into a parse error; a request error keeps the
//!   whole reply as its `detail`.
//! - Tolerated: a missing trailing `;`, values containing `=` (a field splits at
//!   its first `=`), whitespace around fields, names and values, `\r\n` line
//!   ends, empty fields (`;;`), and blank lines around the one reply line.
//! - Refused, with a [`ReplyError`]: no non-blank line, more than one non-blank
//!   line, a field without `=`, a name that is not a shell-style identifier
//!   (`[A-Za-z_][A-Za-z0-9_]*`, since names become environment variable names
//!   in the job bundle), a first field other than `SSGM_ERROR`, an unknown code,
//!   and a granted reply without a job id or with an empty one.
//!
//! Field indexes in errors count the non-empty fields from 0, which is also the
//! position the contract speaks of.

/// How many characters of a raw reply are kept in a request error's `detail`.
const DETAIL_MAX_CHARS: usize = 200;

/// GPUs granted by the scheduler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The scheduler's job id (the value of field 1), passed to `-dealloc -j`.
    pub scheduler_job_id: String,
    /// The name of field 1 as the scheduler spelled it, e.g. `SSGM_JOB`.
    pub(crate) job_field_name: String,
    /// The rCUDA client settings (fields 2..), in reply order, names kept.
    pub(crate) settings: Vec<(String, String)>,
}

impl Grant {
    /// The devices granted: the values of the `RCUDA_DEVICE_<i>` settings, in order.
    #[must_use]
    pub(crate) fn devices(&self) -> Vec<&str> {
        self.settings
            .iter()
            .filter(|(name, _)| {
                name.strip_prefix("RCUDA_DEVICE_")
                    .is_some_and(|i| !i.is_empty() && i.chars().all(|c| c.is_ascii_digit()))
            })
            .map(|(_, value)| value.as_str())
            .collect()
    }

    /// The value of the first setting named `name`, if any.
    #[must_use]
    pub fn setting(&self, name: &str) -> Option<&str> {
        self.settings
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What the scheduler answered to `-alloc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllocReply {
    /// `SSGM_ERROR=0`: GPUs are held for the job until it is released.
    Granted(Grant),
    /// `SSGM_ERROR=2`: not enough free GPUs right now; try again later.
    Busy,
    /// `SSGM_ERROR=1`: the scheduler refused the request itself.
    RequestError {
        /// The raw reply, trimmed and cut to about 200 characters.
        detail: String,
    },
}

/// Why a reply could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// Nothing but whitespace on stdout.
    #[error("empty reply")]
    Empty,
    /// A field is not of the form `NAME=value`.
    #[error("field {index} has no '=': {field:?}")]
    NoEquals {
        /// Position of the field among the non-empty fields, from 0.
        index: usize,
        /// The field, trimmed and cut to about 200 characters.
        field: String,
    },
    /// A field's name is empty or not a shell-style identifier.
    #[error("field {index} has an invalid name: {name:?}")]
    InvalidName {
        /// Position of the field among the non-empty fields, from 0.
        index: usize,
        /// The name, trimmed and cut to about 200 characters.
        name: String,
    },
    /// Field 0 is not `SSGM_ERROR`.
    #[error("first field is {name:?}, expected SSGM_ERROR")]
    NotSsgmError {
        /// The name field 0 has instead.
        name: String,
    },
    /// `SSGM_ERROR` is not `0`, `1` or `2`.
    #[error("unknown SSGM_ERROR value {0:?}")]
    UnknownCode(String),
    /// `SSGM_ERROR=0` with no field after it.
    #[error("granted reply has no job id")]
    MissingJobId,
    /// `SSGM_ERROR=0` whose field 1 has an empty value.
    #[error("granted reply has an empty job id")]
    EmptyJobId,
    /// More than one non-blank line on stdout.
    #[error("reply has {0} lines, expected one")]
    MultipleLines(usize),
}

/// Parses the stdout of `ssgm -alloc` (see the module docs for the format).
///
/// # Errors
///
/// Returns a [`ReplyError`] for output that is not one well-formed reply line.
pub(crate) fn parse_alloc_reply(stdout: &str) -> Result<AllocReply, ReplyError> {
    let line = the_one_line(stdout)?;
    let mut fields = line.split(';').map(str::trim).filter(|f| !f.is_empty());

    let (name, code) = split_field(0, fields.next().ok_or(ReplyError::Empty)?)?;
    if name != "SSGM_ERROR" {
        return Err(ReplyError::NotSsgmError {
            name: name.to_owned(),
        });
    }
    match code {
        "0" => {}
        "1" => {
            return Ok(AllocReply::RequestError {
                detail: truncate_chars(line, DETAIL_MAX_CHARS),
            });
        }
        "2" => return Ok(AllocReply::Busy),
        other => {
            return Err(ReplyError::UnknownCode(truncate_chars(
                other,
                DETAIL_MAX_CHARS,
            )));
        }
    }

    let (job_field_name, job_id) = split_field(1, fields.next().ok_or(ReplyError::MissingJobId)?)?;
    if job_id.is_empty() {
        return Err(ReplyError::EmptyJobId);
    }
    let settings = fields
        .enumerate()
        .map(|(i, field)| split_field(i + 2, field).map(|(n, v)| (n.to_owned(), v.to_owned())))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(AllocReply::Granted(Grant {
        scheduler_job_id: job_id.to_owned(),
        job_field_name: job_field_name.to_owned(),
        settings,
    }))
}

/// The single non-blank line of `stdout`, trimmed.
fn the_one_line(stdout: &str) -> Result<&str, ReplyError> {
    let mut lines = stdout.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().ok_or(ReplyError::Empty)?;
    let extra = lines.count();
    if extra > 0 {
        return Err(ReplyError::MultipleLines(extra + 1));
    }
    Ok(first)
}

/// Splits a trimmed, non-empty field at its first `=` into a trimmed name and value.
fn split_field(index: usize, field: &str) -> Result<(&str, &str), ReplyError> {
    let (name, value) = field.split_once('=').ok_or_else(|| ReplyError::NoEquals {
        index,
        field: truncate_chars(field, DETAIL_MAX_CHARS),
    })?;
    let name = name.trim();
    if !is_identifier(name) {
        return Err(ReplyError::InvalidName {
            index,
            name: truncate_chars(name, DETAIL_MAX_CHARS),
        });
    }
    Ok((name, value.trim()))
}

/// Whether `name` is `[A-Za-z_][A-Za-z0-9_]*`, i.e. usable as an environment variable name.
fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The job id of a grant found in output that is not a valid reply, or that
/// came from a failed or killed call, so that the GPUs the scheduler may hold
/// for it can be released.
///
/// This is for cleanup only, never a grant: it looks at every line for one
/// whose first field is `SSGM_ERROR=0` and whose second field has a non-empty
/// value, and ignores whatever else is wrong.
pub(crate) fn find_granted_job_id(stdout: &str) -> Option<&str> {
    stdout.lines().find_map(|line| {
        let mut fields = line.split(';').map(str::trim).filter(|f| !f.is_empty());
        let (name, code) = fields.next()?.split_once('=')?;
        if name.trim() != "SSGM_ERROR" || code.trim() != "0" {
            return None;
        }
        let (_, job) = fields.next()?.split_once('=')?;
        Some(job.trim()).filter(|job| !job.is_empty())
    })
}

/// `s` cut to at most `max` characters, with `…` marking a cut.
pub(crate) fn truncate_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn granted(job: &str, settings: &[(&str, &str)]) -> AllocReply {
        AllocReply::Granted(Grant {
            scheduler_job_id: job.to_owned(),
            job_field_name: "SSGM_JOB".to_owned(),
            settings: settings
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect(),
        })
    }

    #[test]
    fn granted_one_gpu() {
        let reply = parse_alloc_reply(
            "SSGM_ERROR=0;SSGM_JOB=42;RCUDA_DEVICE_COUNT=1;RCUDA_DEVICE_0=gpu1:0;\n",
        );
        assert_eq!(
            reply,
            Ok(granted(
                "42",
                &[("RCUDA_DEVICE_COUNT", "1"), ("RCUDA_DEVICE_0", "gpu1:0")]
            ))
        );
    }

    #[test]
    fn granted_three_gpus() {
        let reply = parse_alloc_reply(
            "SSGM_ERROR=0;SSGM_JOB=7;RCUDA_DEVICE_COUNT=3;RCUDA_DEVICE_0=gpu1:0;\
             RCUDA_DEVICE_1=gpu2:1;RCUDA_DEVICE_2=gpu3;\n",
        )
        .expect("valid reply");
        let AllocReply::Granted(grant) = reply else {
            panic!("expected a grant, got {reply:?}");
        };
        assert_eq!(grant.scheduler_job_id, "7");
        assert_eq!(grant.settings.len(), 4);
        assert_eq!(grant.setting("RCUDA_DEVICE_COUNT"), Some("3"));
        assert_eq!(grant.setting("RCUDA_DEVICE_1"), Some("gpu2:1"));
        assert_eq!(grant.setting("RCUDA_DEVICE_2"), Some("gpu3"));
        assert_eq!(grant.setting("RCUDA_DEVICE_3"), None);
    }

    #[test]
    fn job_field_name_is_kept_whatever_it_is() {
        let reply = parse_alloc_reply("SSGM_ERROR=0;JOB_ID=abc-9;RCUDA_DEVICE_COUNT=1;");
        let Ok(AllocReply::Granted(grant)) = reply else {
            panic!("expected a grant, got {reply:?}");
        };
        assert_eq!(grant.job_field_name, "JOB_ID");
        assert_eq!(grant.scheduler_job_id, "abc-9");
    }

    #[test]
    fn granted_without_settings_is_accepted() {
        assert_eq!(
            parse_alloc_reply("SSGM_ERROR=0;SSGM_JOB=5;"),
            Ok(granted("5", &[]))
        );
    }

    #[test]
    fn busy() {
        assert_eq!(parse_alloc_reply("SSGM_ERROR=2;\n"), Ok(AllocReply::Busy));
        assert_eq!(parse_alloc_reply("SSGM_ERROR=2"), Ok(AllocReply::Busy));
        assert_eq!(
            parse_alloc_reply("SSGM_ERROR=2;SSGM_JOB=;"),
            Ok(AllocReply::Busy)
        );
    }

    #[test]
    fn request_error_keeps_the_raw_reply() {
        assert_eq!(
            parse_alloc_reply("SSGM_ERROR=1;SSGM_MSG=too many GPUs;\n"),
            Ok(AllocReply::RequestError {
                detail: "SSGM_ERROR=1;SSGM_MSG=too many GPUs;".to_owned()
            })
        );
        assert_eq!(
            parse_alloc_reply("SSGM_ERROR=1"),
            Ok(AllocReply::RequestError {
                detail: "SSGM_ERROR=1".to_owned()
            })
        );
    }

    #[test]
    fn request_error_with_free_text_after_the_code() {
        // A message with its own ';' must not hide the scheduler's answer.
        let reply = parse_alloc_reply("SSGM_ERROR=1;bad request; see log");
        assert!(
            matches!(reply, Ok(AllocReply::RequestError { .. })),
            "{reply:?}"
        );
    }

    #[test]
    fn request_error_detail_is_cut() {
        let long = format!("SSGM_ERROR=1;SSGM_MSG={};", "x".repeat(1000));
        let Ok(AllocReply::RequestError { detail }) = parse_alloc_reply(&long) else {
            panic!("expected a request error");
        };
        assert_eq!(detail.chars().count(), DETAIL_MAX_CHARS + 1);
        assert!(detail.ends_with('…'));
    }

    #[test]
    fn empty_output() {
        assert_eq!(parse_alloc_reply(""), Err(ReplyError::Empty));
    }

    #[test]
    fn whitespace_only() {
        assert_eq!(parse_alloc_reply(" \n\t\r\n  \n"), Err(ReplyError::Empty));
        assert_eq!(parse_alloc_reply(" ; ;; \n"), Err(ReplyError::Empty));
    }

    #[test]
    fn garbage() {
        assert_eq!(
            parse_alloc_reply("Segmentation fault (core dumped)\n"),
            Err(ReplyError::NoEquals {
                index: 0,
                field: "Segmentation fault (core dumped)".to_owned()
            })
        );
        assert_eq!(
            parse_alloc_reply("<html>"),
            Err(ReplyError::NoEquals {
                index: 0,
                field: "<html>".to_owned()
            })
        );
        assert_eq!(
            parse_alloc_reply("<html><body>\n<h1>502</h1>\n</body></html>\n"),
            Err(ReplyError::MultipleLines(3))
        );
        assert_eq!(
            parse_alloc_reply("<a href=\"x\">"),
            Err(ReplyError::InvalidName {
                index: 0,
                name: "<a href".to_owned()
            })
        );
    }

    #[test]
    fn no_trailing_semicolon() {
        assert_eq!(
            parse_alloc_reply(
                "SSGM_ERROR=0;SSGM_JOB=42;RCUDA_DEVICE_COUNT=1;RCUDA_DEVICE_0=gpu1:0"
            ),
            Ok(granted(
                "42",
                &[("RCUDA_DEVICE_COUNT", "1"), ("RCUDA_DEVICE_0", "gpu1:0")]
            ))
        );
    }

    #[test]
    fn equals_inside_a_value() {
        assert_eq!(
            parse_alloc_reply("SSGM_ERROR=0;SSGM_JOB=a=b;RCUDA_OPTS=x=1,y=2;"),
            Ok(granted("a=b", &[("RCUDA_OPTS", "x=1,y=2")]))
        );
    }

    #[test]
    fn spaces_around_fields_names_and_values() {
        assert_eq!(
            parse_alloc_reply(
                "  SSGM_ERROR = 0 ; SSGM_JOB= 42 ;\tRCUDA_DEVICE_COUNT =1; RCUDA_DEVICE_0 = gpu 1:0 ;  \n"
            ),
            Ok(granted(
                "42",
                &[("RCUDA_DEVICE_COUNT", "1"), ("RCUDA_DEVICE_0", "gpu 1:0")]
            ))
        );
    }

    #[test]
    fn crlf_and_blank_lines_around() {
        assert_eq!(
            parse_alloc_reply("\r\n\r\nSSGM_ERROR=0;SSGM_JOB=42;RCUDA_DEVICE_COUNT=1;\r\n\r\n"),
            Ok(granted("42", &[("RCUDA_DEVICE_COUNT", "1")]))
        );
    }

    #[test]
    fn two_reply_lines_are_refused() {
        assert_eq!(
            parse_alloc_reply("SSGM_ERROR=0;SSGM_JOB=1;\nSSGM_ERROR=0;SSGM_JOB=2;\n"),
            Err(ReplyError::MultipleLines(2))
        );
    }

    #[test]
    fn unknown_code() {
        assert_eq!(
            parse_alloc_reply("SSGM_ERROR=7;"),
            Err(ReplyError::UnknownCode("7".to_owned()))
        );
        assert_eq!(
            parse_alloc_reply("SSGM_ERROR=;"),
            Err(ReplyError::UnknownCode(String::new()))
        );
    }

    #[test]
    fn first_field_not_ssgm_error() {
        assert_eq!(
            parse_alloc_reply("SSGM_JOB=42;SSGM_ERROR=0;"),
            Err(ReplyError::NotSsgmError {
                name: "SSGM_JOB".to_owned()
            })
        );
        // The name is matched exactly: a lower-case variant is not the contract.
        assert_eq!(
            parse_alloc_reply("ssgm_error=0;SSGM_JOB=42;"),
            Err(ReplyError::NotSsgmError {
                name: "ssgm_error".to_owned()
            })
        );
    }

    #[test]
    fn job_id_missing_or_empty() {
        assert_eq!(
            parse_alloc_reply("SSGM_ERROR=0;"),
            Err(ReplyError::MissingJobId)
        );
        assert_eq!(
            parse_alloc_reply("SSGM_ERROR=0;SSGM_JOB=;RCUDA_DEVICE_COUNT=1;"),
            Err(ReplyError::EmptyJobId)
        );
        assert_eq!(
            parse_alloc_reply("SSGM_ERROR=0;SSGM_JOB=   ;"),
            Err(ReplyError::EmptyJobId)
        );
        assert_eq!(
            parse_alloc_reply("SSGM_ERROR=0;42;"),
            Err(ReplyError::NoEquals {
                index: 1,
                field: "42".to_owned()
            })
        );
    }

    #[test]
    fn empty_fields_inside_are_skipped() {
        assert_eq!(
            parse_alloc_reply("SSGM_ERROR=0;;SSGM_JOB=42;; ;RCUDA_DEVICE_COUNT=1;;"),
            Ok(granted("42", &[("RCUDA_DEVICE_COUNT", "1")]))
        );
    }

    #[test]
    fn malformed_setting_in_a_grant_is_refused() {
        assert_eq!(
            parse_alloc_reply("SSGM_ERROR=0;SSGM_JOB=42;RCUDA_DEVICE_COUNT=1;oops;"),
            Err(ReplyError::NoEquals {
                index: 3,
                field: "oops".to_owned()
            })
        );
        assert_eq!(
            parse_alloc_reply("SSGM_ERROR=0;SSGM_JOB=42;=1;"),
            Err(ReplyError::InvalidName {
                index: 2,
                name: String::new()
            })
        );
        assert_eq!(
            parse_alloc_reply("SSGM_ERROR=0;SSGM_JOB=42;RCUDA DEVICE=1;"),
            Err(ReplyError::InvalidName {
                index: 2,
                name: "RCUDA DEVICE".to_owned()
            })
        );
    }

    #[test]
    fn granted_job_id_is_found_in_broken_output() {
        assert_eq!(
            find_granted_job_id("SSGM_ERROR=0;SSGM_JOB=5;oops"),
            Some("5")
        );
        assert_eq!(
            find_granted_job_id("warning: slow\r\n SSGM_ERROR = 0 ; JOB_ID = 6 \nbye\n"),
            Some("6")
        );
        assert_eq!(
            find_granted_job_id("SSGM_ERROR=0;SSGM_JOB=7;RCUDA_DEVICE_COUNT=1;"),
            Some("7")
        );
        for none in [
            "",
            "SSGM_ERROR=2;",
            "SSGM_ERROR=1;SSGM_JOB=5;",
            "SSGM_ERROR=0;",
            "SSGM_ERROR=0;SSGM_JOB=;",
            "SSGM_ERROR=0;5;",
            "Segmentation fault (core dumped)",
        ] {
            assert_eq!(find_granted_job_id(none), None, "{none:?}");
        }
    }

    #[test]
    fn errors_read_well() {
        assert_eq!(ReplyError::Empty.to_string(), "empty reply");
        assert_eq!(
            ReplyError::MultipleLines(3).to_string(),
            "reply has 3 lines, expected one"
        );
        assert_eq!(
            ReplyError::UnknownCode("7".to_owned()).to_string(),
            "unknown SSGM_ERROR value \"7\""
        );
    }
}
