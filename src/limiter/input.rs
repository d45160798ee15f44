//! Request fields parsed once into small checked types. Each type knows its field's name and
//! takes a [`FieldPath`] for where it sits, so an error names `recipient` in Admit and
//! `requests[3].recipient` in AdmitBatch, and that path is built in one place.

use std::fmt;

use crate::error::{quote, Error};
use crate::policy::{self, ScopeKey, ScopeMode, Tier};

use super::Limiter;

/// Where a request's fields sit: at the top of the request, or in item `i` of a repeated field.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FieldPath {
    item: Option<(&'static str, usize)>,
}

impl FieldPath {
    /// Fields of the request itself.
    pub const TOP: FieldPath = FieldPath { item: None };

    /// Fields of item `index` of the repeated field `list`.
    pub fn item(list: &'static str, index: usize) -> FieldPath {
        FieldPath { item: Some((list, index)) }
    }

    /// Fields of item `index` of AdmitBatch's `requests`.
    pub fn batch(index: usize) -> FieldPath {
        FieldPath::item("requests", index)
    }

    /// The full name of field `name` here, e.g. `requests[3].recipient`.
    pub fn field(self, name: &str) -> String {
        match self.item {
            None => name.to_owned(),
            Some((list, i)) => format!("{list}[{i}].{name}"),
        }
    }

    /// The error for field `name` here.
    pub fn invalid(self, name: &str, message: impl Into<String>) -> Error {
        Error::InvalidArgument { field: self.field(name), message: message.into() }
    }

    /// The error for field `name` here naming something this sidecar does not serve.
    pub fn not_found(self, name: &str, message: impl Into<String>) -> Error {
        Error::NotFound { field: self.field(name), message: message.into() }
    }
}

/// A portfolio id: 1–128 characters of `[A-Za-z0-9_.:-]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortfolioId(String);

impl PortfolioId {
    /// Checks `portfolio_id` at `at`.
    pub fn parse(raw: &str, at: FieldPath) -> Result<PortfolioId, Error> {
        policy::validate_id(raw).map_err(|m| at.invalid("portfolio_id", m))?;
        Ok(PortfolioId(raw.to_owned()))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A sender (phone number) id, checked like a portfolio id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderId(String);

impl SenderId {
    /// Checks `sender_id` at `at`.
    pub fn parse(raw: &str, at: FieldPath) -> Result<SenderId, Error> {
        policy::validate_id(raw).map_err(|m| at.invalid("sender_id", m))?;
        Ok(SenderId(raw.to_owned()))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id, owned.
    pub fn into_string(self) -> String {
        self.0
    }
}

/// A recipient in the form that is hashed (see [`policy::normalize_recipient`]). It is never
/// stored or logged as such: its `Debug` hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct Recipient(String);

impl Recipient {
    /// Normalises `recipient` at `at`; the error never repeats the number.
    pub fn parse(raw: &str, at: FieldPath) -> Result<Recipient, Error> {
        policy::normalize_recipient(raw).map(Recipient).map_err(|m| at.invalid("recipient", m))
    }

    /// The normalised recipient, for hashing only.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Recipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Recipient(***)")
    }
}

/// A template name: 1 to 512 characters, none of them control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateName(String);

impl TemplateName {
    /// Checks the template name in field `name` at `at`.
    pub fn parse(raw: &str, at: FieldPath, name: &str) -> Result<TemplateName, Error> {
        if raw.is_empty() || raw.len() > 512 || raw.contains(char::is_control) {
            return Err(at.invalid(name, "must be a template name of 1 to 512 characters"));
        }
        Ok(TemplateName(raw.to_owned()))
    }

    /// An Admit's optional `template`: empty means none.
    pub fn optional(raw: &str, at: FieldPath) -> Result<Option<TemplateName>, Error> {
        (!raw.is_empty()).then(|| TemplateName::parse(raw, at, "template")).transpose()
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name, owned.
    pub fn into_string(self) -> String {
        self.0
    }
}

/// A template's language as Meta names it (`en_US`, `pt_BR`): 1 to 32 characters of
/// `[A-Za-z0-9_-]`. The Redis store relies on it holding no `:` and no `,`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateLanguage(String);

impl TemplateLanguage {
    /// The longest language code accepted.
    pub const MAX_LEN: usize = 32;

    /// Checks the language in field `name` at `at`; empty means none (an Admit) or every
    /// language (UpdatePortfolio). The error never repeats the input.
    pub fn optional(raw: &str, at: FieldPath, name: &str) -> Result<Option<TemplateLanguage>, Error> {
        if raw.is_empty() {
            return Ok(None);
        }
        let valid = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
        if raw.len() > Self::MAX_LEN || !raw.chars().all(valid) {
            return Err(
                at.invalid(name, "must be a language code (e.g. en_US) of at most 32 characters of [A-Za-z0-9_-]")
            );
        }
        Ok(Some(TemplateLanguage(raw.to_owned())))
    }

    /// The code.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The code, owned.
    pub fn into_string(self) -> String {
        self.0
    }
}

/// An Admit's idempotency key: 1 to 128 printable ASCII characters. Only its keyed hash is
/// stored, and neither `Debug` nor errors show it.
#[derive(Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// The longest key accepted, in bytes.
    pub const MAX_LEN: usize = 128;

    /// Checks `idempotency_key` at `at`; empty means none. The error never repeats the key.
    pub fn optional(raw: &str, at: FieldPath) -> Result<Option<IdempotencyKey>, Error> {
        if raw.is_empty() {
            return Ok(None);
        }
        if raw.len() > Self::MAX_LEN || !raw.chars().all(|c| c == ' ' || c.is_ascii_graphic()) {
            return Err(at.invalid("idempotency_key", "must be at most 128 printable ASCII characters"));
        }
        Ok(Some(IdempotencyKey(raw.to_owned())))
    }

    /// The key, for hashing only.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IdempotencyKey(***)")
    }
}

impl Limiter {
    /// Resolves the limit scope of `portfolio_id` and `sender_id` at `at`. The sender is
    /// optional in portfolio scope (but checked when given) and required in per-number scope.
    pub(super) fn parse_scope(
        &self,
        portfolio: &str,
        sender: &str,
        at: FieldPath,
    ) -> Result<(ScopeKey, Option<SenderId>), Error> {
        let portfolio = PortfolioId::parse(portfolio, at)?;
        let per_number = self.scope_mode == ScopeMode::PhoneNumber;
        let sender = if sender.is_empty() && per_number {
            return Err(at.invalid("sender_id", "is required in per-number scope (policy.scope = \"phone_number\")"));
        } else if sender.is_empty() {
            None
        } else {
            Some(SenderId::parse(sender, at)?)
        };
        let scope = self.scope_of(portfolio.as_str(), sender.as_ref().map_or("", SenderId::as_str));
        Ok((scope, sender))
    }

    /// The ladder's tier named in field `tier`; the error quotes at most the start of the name.
    pub(super) fn parse_tier(&self, name: &str) -> Result<Tier, Error> {
        if name.len() > policy::MAX_TIER_NAME_LEN {
            let limit = policy::MAX_TIER_NAME_LEN;
            let message = format!("is {} bytes long; a tier name has at most {limit}", name.len());
            return Err(FieldPath::TOP.invalid("tier", message));
        }
        self.ladder.get(name).cloned().ok_or_else(|| {
            let message = format!("unknown tier {}; the ladder has {}", quote(name), self.ladder.names());
            FieldPath::TOP.invalid("tier", message)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_the_item_of_a_batch() {
        assert_eq!(FieldPath::TOP.field("recipient"), "recipient");
        assert_eq!(FieldPath::batch(3).field("recipient"), "requests[3].recipient");
        assert_eq!(FieldPath::item("senders", 0).field("status"), "senders[0].status");
    }

    #[test]
    fn recipients_are_not_shown_by_debug_or_errors() {
        let r = Recipient::parse("+1 415 555 0100", FieldPath::TOP).unwrap();
        assert!(!format!("{r:?}").contains("415"));
        let e = Recipient::parse("+1 415 555 0100 x", FieldPath::batch(1)).unwrap_err();
        assert!(e.to_string().starts_with("requests[1].recipient: "), "{e}");
        assert!(!e.to_string().contains("415"), "{e}");
    }

    #[test]
    fn idempotency_keys_are_short_printable_and_never_shown() {
        assert_eq!(IdempotencyKey::optional("", FieldPath::TOP).unwrap(), None);
        let key = IdempotencyKey::optional("wamid.HBgL 42:retry", FieldPath::TOP).unwrap().unwrap();
        assert!(!format!("{key:?}").contains("wamid"));
        assert!(IdempotencyKey::optional(&"k".repeat(128), FieldPath::TOP).is_ok());
        for bad in ["k".repeat(129), "secret\n".into(), "sécret".into(), "tab\there".into()] {
            let e = IdempotencyKey::optional(&bad, FieldPath::batch(3)).unwrap_err();
            assert!(e.to_string().starts_with("requests[3].idempotency_key: "), "{e}");
            assert!(!e.to_string().contains("ecret") && !e.to_string().contains("kkk"), "{e}");
        }
    }
}
