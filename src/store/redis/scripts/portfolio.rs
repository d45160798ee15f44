//! The protocol of `portfolio.lua`: everything persisted about one portfolio besides its windows.

use std::sync::LazyLock;

use redis::{Script, ScriptInvocation, Value};

use super::{bad_reply, field, Call};
use crate::policy::{Mode, Quality, SenderStatus};
use crate::store::{PortfolioState, StoreError, TemplateKey, TemplateState};

// No prelude: the script returns the hash as it is, and Rust reads the field names.
static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("portfolio.lua")));

/// The arguments of one read.
#[derive(Debug)]
pub struct PortfolioArgs {
    /// The portfolio's state hash.
    pub state: String,
    /// The portfolio's opted-out recipients (set).
    pub opted_out: String,
}

/// The script's reply, decoded.
pub type PortfolioReply = PortfolioState;

impl Call for PortfolioArgs {
    type Reply = PortfolioReply;

    fn script() -> &'static Script {
        &SCRIPT
    }

    fn key(&self) -> &str {
        &self.state
    }

    fn encode(&self, inv: &mut ScriptInvocation<'static>) {
        inv.key(&self.state).key(&self.opted_out);
    }

    fn decode(&self, reply: Value) -> Result<PortfolioState, StoreError> {
        let (fields, opted_out): (Vec<(String, String)>, u64) =
            redis::from_redis_value(reply).map_err(|_| bad_reply("portfolio"))?;
        Ok(portfolio_state(fields, opted_out))
    }
}

/// Splits `<prefix>:<rest>` for one of the prefixes in [`field`].
fn strip<'a>(name: &'a str, prefix: &str) -> Option<&'a str> {
    name.strip_prefix(prefix)?.strip_prefix(':')
}

/// Reads the portfolio hash (its layout is in [`field`] and `apply.lua`); unknown fields are
/// skipped, so an older sidecar reads what a newer one wrote.
fn portfolio_state(fields: Vec<(String, String)>, opted_out: u64) -> PortfolioState {
    let mut state = PortfolioState { opted_out, ..PortfolioState::default() };
    for (name, value) in fields {
        if name == field::QUALITY {
            state.quality = Quality::parse(&value).unwrap_or_default();
        } else if let Some(rest) = strip(&name, field::SENDER) {
            let Some((sender, attr)) = rest.rsplit_once(':') else { continue };
            // A number's throughput schedule is Admit's bookkeeping: it names no sender, as a
            // number that only sent is not one the portfolio knows anything about.
            if attr == field::THROUGHPUT_TAT {
                continue;
            }
            let s = state.senders.entry(sender.to_owned()).or_default();
            match attr {
                field::STATUS => s.status = SenderStatus::parse(&value),
                field::ITEM_QUALITY => s.quality = Quality::parse(&value).unwrap_or_default(),
                field::SINCE => s.since = value.parse().ok(),
                field::THROUGHPUT => s.throughput_mps = value.parse().ok(),
                field::THROUGHPUT_BACKOFF => s.throughput_backoff_until = value.parse().ok(),
                _ => {}
            }
        } else if name == field::MODE {
            state.mode = Mode::parse(&value);
        } else if let Some(rest) = strip(&name, field::TEMPLATE) {
            let Some((template, attr)) = rest.rsplit_once(':') else { continue };
            template_attribute(state.templates.entry(TemplateKey::new(template, "")).or_default(), attr, value);
        } else if let Some(rest) = strip(&name, field::TEMPLATE_LANGUAGE) {
            // The language holds no ':', so the first one ends it; the name may hold any.
            let Some((language, rest)) = rest.split_once(':') else { continue };
            let Some((template, attr)) = rest.rsplit_once(':') else { continue };
            let key = TemplateKey::new(template, language);
            template_attribute(state.templates.entry(key).or_default(), attr, value);
        } else if let Some(key) = strip(&name, field::ALERT) {
            state.alerts.insert(key.to_owned(), value);
        } else if let Some(display) = strip(&name, field::ALIAS) {
            state.aliases.insert(display.to_owned(), value);
        }
    }
    state
}

/// One attribute of a template (in one language or in every language).
fn template_attribute(t: &mut TemplateState, attr: &str, value: String) {
    match attr {
        field::STATUS => t.status = Some(value),
        field::ITEM_QUALITY => t.quality = Quality::parse(&value).unwrap_or_default(),
        field::AT => t.at = value.parse().ok(),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_fields_are_read_per_language_and_names_may_hold_colons() {
        let fields = [
            ("t:otp:v2:status", "PAUSED"),
            ("t:otp:v2:at", "5"),
            ("tl:en_US:otp:v2:status", "APPROVED"),
            ("tl:en_US:otp:v2:quality", "LOW"),
            ("tl:en_US:otp:v2:at", "7"),
            ("tls:otp:v2", "en_US"),
        ];
        let state = portfolio_state(fields.iter().map(|(f, v)| (f.to_string(), v.to_string())).collect(), 0);
        let every = &state.templates[&TemplateKey::new("otp:v2", "")];
        assert_eq!((every.status.as_deref(), every.at), (Some("PAUSED"), Some(5)));
        let en = &state.templates[&TemplateKey::new("otp:v2", "en_US")];
        assert_eq!((en.status.as_deref(), en.quality, en.at), (Some("APPROVED"), Quality::Low, Some(7)));
        assert_eq!(state.templates.len(), 2, "the list of languages is no template");
    }

    #[test]
    fn a_numbers_throughput_schedule_names_no_sender_and_its_backoff_and_the_mode_are_read() {
        let fields = [("s:15550001:tat", "9"), ("s:15550002:bo", "11"), ("mode", "shadow")];
        let state = portfolio_state(fields.iter().map(|(f, v)| (f.to_string(), v.to_string())).collect(), 0);
        assert_eq!(state.senders.keys().collect::<Vec<_>>(), ["15550002"]);
        assert_eq!(state.senders["15550002"].throughput_backoff_until, Some(11));
        assert_eq!(state.mode, Some(Mode::Shadow));
    }
}
