//! Meta's webhook payloads parsed into the limiter's typed [`Event`]s. A change tiergate does not
//! follow, or cannot read, parses to `None`. What an event changes (which scopes a tier applies
//! to, that a quality event never lifts a ban) is decided by the limiter, not here.

use serde_json::Value;

use crate::limiter::{
    Event, FieldPath, Inbound, NumberEvent, Recipient, ReportedLimits, SenderId, Status, TemplateLanguage,
};
use crate::policy::Delivery;
use crate::policy::{self, Micros, Quality, TierValue};

/// One entry of a delivery: a WABA's changes, all made at the entry's time.
pub struct Entry<'a> {
    /// The WABA id, checked like a portfolio id.
    pub waba: String,
    /// When Meta says the changes happened.
    pub at: Option<Micros>,
    /// Each change's `field`, and its event when tiergate follows it.
    pub changes: Vec<(&'a str, Option<Event>)>,
}

/// An entry of a delivery, or `None` when it names no usable WABA id.
pub fn entry(v: &Value) -> Option<Entry<'_>> {
    let waba = v.get("id").and_then(text).filter(|w| policy::validate_id(w).is_ok())?;
    let at = v.get("time").and_then(seconds_to_micros);
    let changes = v.get("changes").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]);
    let changes = changes
        .iter()
        .map(|c| {
            let field = c.get("field").and_then(Value::as_str).unwrap_or("");
            (field, event(field, c.get("value").unwrap_or(&Value::Null)))
        })
        .collect();
    Some(Entry { waba, at, changes })
}

/// The event of one change with this `field` and `value`.
pub fn event(field: &str, v: &Value) -> Option<Event> {
    let limits = |number: &str| ReportedLimits {
        business: v.get("max_daily_conversations_per_business").and_then(tier_value),
        number: v.get(number).and_then(tier_value),
    };
    // Meta rates and pauses each (name, language); one without a language is for every language,
    // and one whose language cannot be a language code is not followed.
    let language = || match v.get("message_template_language").and_then(text) {
        Some(l) => TemplateLanguage::optional(&l, FieldPath::TOP, "message_template_language").ok(),
        None => Some(None),
    };
    match field {
        "phone_number_quality_update" => {
            let event = match v.get("event").and_then(Value::as_str) {
                Some("FLAGGED") => Some(NumberEvent::Flagged),
                Some("UNFLAGGED") => Some(NumberEvent::Unflagged),
                Some("THROUGHPUT_UPGRADE") => {
                    Some(NumberEvent::Throughput { mps: Some(policy::UPGRADED_THROUGHPUT_MPS) })
                }
                Some(e) if e.contains("THROUGHPUT") => Some(NumberEvent::Throughput { mps: None }),
                _ => None,
            };
            // A throughput event's `current_limit` is the number's throughput level, not a
            // messaging limit, so a throughput event carries no limit at all.
            let throughput = matches!(event, Some(NumberEvent::Throughput { .. }));
            Some(Event::NumberQuality {
                display: v.get("display_phone_number").and_then(text).and_then(|d| digits(&d)),
                event,
                limits: if throughput { ReportedLimits::default() } else { limits("current_limit") },
                quality: ["quality_rating", "new_quality_score", "quality_score"]
                    .iter()
                    .find_map(|f| v.get(*f).and_then(Value::as_str).and_then(Quality::parse)),
            })
        }
        "business_capability_update" => Some(Event::Capability { limits: limits("max_daily_conversation_per_phone") }),
        "message_template_status_update" => Some(Event::TemplateStatus {
            name: v.get("message_template_name").and_then(text)?,
            language: language()?,
            status: v.get("event").and_then(Value::as_str)?.to_owned(),
        }),
        "message_template_quality_update" => Some(Event::TemplateQuality {
            name: v.get("message_template_name").and_then(text)?,
            language: language()?,
            quality: v.get("new_quality_score").and_then(Value::as_str).and_then(Quality::parse)?,
        }),
        "messages" => {
            let metadata = v.get("metadata");
            let number = metadata.and_then(|m| m.get("phone_number_id")).and_then(text)?;
            let number = SenderId::parse(&number, FieldPath::TOP).ok()?;
            let display = metadata.and_then(|m| m.get("display_phone_number")).and_then(text).and_then(|d| digits(&d));
            let contacts = v.get("contacts").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]);
            let inbound = v.get("messages").and_then(Value::as_array).into_iter().flatten().map(|m| {
                let at = m.get("timestamp").and_then(seconds_to_micros);
                // A form we cannot parse is skipped, not logged: it may be a number. The message
                // is kept even without any, since it still took its number's throughput.
                let forms = user_forms(m, contacts);
                let from = forms.iter().filter_map(|f| Recipient::parse(f, FieldPath::TOP).ok()).collect();
                Inbound { from, at }
            });
            let statuses = v.get("statuses").and_then(Value::as_array).into_iter().flatten().filter_map(|s| {
                let delivery = match s.get("status").and_then(Value::as_str)? {
                    "delivered" | "read" => Delivery::Delivered,
                    "failed" => Delivery::Failed,
                    // `sent` (and anything new) changes nothing.
                    _ => return None,
                };
                let recipient = Recipient::parse(&s.get("recipient_id").and_then(text)?, FieldPath::TOP).ok()?;
                // Meta's timestamps are whole seconds: a status is taken at the end of its second,
                // so the Admit of the message it reports (sent before it) is never seen as later.
                let at = s.get("timestamp").and_then(seconds_to_micros).map(|t| t + 999_999);
                let errors = if delivery == Delivery::Failed { error_codes(s) } else { Vec::new() };
                Some(Status { recipient, delivery, at, errors })
            });
            Some(Event::Messages { number, display, inbound: inbound.collect(), statuses: statuses.collect() })
        }
        "account_alerts" => {
            let info = v.get("alert_info");
            let kind = info.and_then(|i| i.get("alert_type")).and_then(text).unwrap_or_else(|| "ALERT".into());
            let entity = v.get("entity_id").and_then(text).unwrap_or_default();
            Some(Event::Alert { key: format!("{kind}:{entity}"), body: v.to_string() })
        }
        _ => None,
    }
}

/// The change fields tiergate follows; [`event`]'s match has one arm for each.
pub const FIELDS: [&str; 6] = [
    "phone_number_quality_update",
    "business_capability_update",
    "message_template_status_update",
    "message_template_quality_update",
    "messages",
    "account_alerts",
];

/// Every form of the user who sent message `m`: its phone number (`from`) and business-scoped
/// user id (`from_user_id`), and the other form from the `contacts[]` entry (`wa_id`, `user_id`)
/// that shares one of them, so a reply to either form is inside the window the message opened.
fn user_forms(m: &Value, contacts: &[Value]) -> Vec<String> {
    let mut forms: Vec<String> = ["from", "from_user_id"].iter().filter_map(|f| m.get(*f).and_then(text)).collect();
    for contact in contacts {
        let ids: Vec<String> = ["wa_id", "user_id"].iter().filter_map(|f| contact.get(*f).and_then(text)).collect();
        if ids.iter().any(|id| forms.contains(id)) {
            for id in ids {
                if !forms.contains(&id) {
                    forms.push(id);
                }
            }
        }
    }
    forms
}

/// The most error codes kept of one failed status (Meta sends one).
pub const MAX_STATUS_ERRORS: usize = 8;

/// The codes of a failed status's `errors[]`, each a number or a numeric string; others are
/// skipped, and at most [`MAX_STATUS_ERRORS`] are kept.
fn error_codes(status: &Value) -> Vec<u32> {
    let errors = status.get("errors").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]);
    errors.iter().filter_map(|e| text(e.get("code")?)?.parse::<u32>().ok()).take(MAX_STATUS_ERRORS).collect()
}

/// A string or a number, as text (Meta sends ids both ways).
fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A tier as Meta sends it: `TIER_*`, or a limit as a number or a numeric string.
fn tier_value(v: &Value) -> Option<TierValue> {
    match v {
        Value::Number(n) => n.as_i64().map(TierValue::Limit),
        Value::String(s) => match s.parse::<i64>() {
            Ok(n) => Some(TierValue::Limit(n)),
            Err(_) => Some(TierValue::Name(s.to_ascii_uppercase())),
        },
        _ => None,
    }
}

fn seconds_to_micros(v: &Value) -> Option<Micros> {
    text(v)?.parse::<u64>().ok().map(|s| s.saturating_mul(1_000_000))
}

/// The digits of a display phone number, by which the limiter finds the number's id.
fn digits(display: &str) -> Option<String> {
    let digits: String = display.chars().filter(char::is_ascii_digit).collect();
    (!digits.is_empty()).then_some(digits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tiers_come_as_names_or_numbers() {
        assert_eq!(tier_value(&json!("TIER_2K")), Some(TierValue::Name("TIER_2K".into())));
        assert_eq!(tier_value(&json!(-1)), Some(TierValue::Limit(-1)));
        assert_eq!(tier_value(&json!("10000")), Some(TierValue::Limit(10_000)));
        assert_eq!(tier_value(&json!(null)), None);
    }

    #[test]
    fn display_numbers_become_their_digits() {
        assert_eq!(digits("+1 555-000-1111").as_deref(), Some("15550001111"));
        assert_eq!(digits("none"), None);
    }

    #[test]
    fn quality_updates_carry_both_limits_and_only_flag_events() {
        let v = json!({"display_phone_number": "+1 555 000 1111", "event": "ONBOARDING", "current_limit": "TIER_1K",
                       "max_daily_conversations_per_business": 2000});
        let Some(Event::NumberQuality { display, event, limits, .. }) = event("phone_number_quality_update", &v) else {
            panic!("a quality update")
        };
        assert_eq!((display.as_deref(), event), (Some("15550001111"), None));
        assert_eq!(limits.business, Some(TierValue::Limit(2000)));
        assert_eq!(limits.number, Some(TierValue::Name("TIER_1K".into())));
    }

    #[test]
    fn messages_need_a_valid_number_and_skip_unreadable_users() {
        let v = json!({"metadata": {"phone_number_id": "106540352242922"},
                       "messages": [{"from": "16505551234", "timestamp": "1700000000"}, {"from": "call me"}]});
        let Some(Event::Messages { number, inbound, .. }) = event("messages", &v) else { panic!("messages") };
        assert_eq!(number.as_str(), "106540352242922");
        let users: Vec<Vec<&str>> = inbound.iter().map(|m| m.from.iter().map(Recipient::as_str).collect()).collect();
        assert_eq!(users, [vec!["16505551234"], vec![]], "the unreadable user's message is still a message");
        assert_eq!(inbound[0].at, Some(1_700_000_000_000_000));
        assert_eq!(event("messages", &json!({"metadata": {"phone_number_id": "not an id"}})), None);
        assert_eq!(event("security", &json!({})), None);
    }

    #[test]
    fn a_contact_with_a_number_and_a_user_id_opens_both_windows() {
        let v = json!({"metadata": {"phone_number_id": "106540352242922"},
                       "contacts": [{"wa_id": "16505551234", "user_id": "US.13491208655302741918"},
                                    {"wa_id": "447700900123", "user_id": "GB.99"}],
                       "messages": [{"from": "16505551234", "timestamp": "1700000000"},
                                    {"from_user_id": "GB.99", "timestamp": "1700000001"}]});
        let Some(Event::Messages { inbound, .. }) = event("messages", &v) else { panic!("messages") };
        let users: Vec<(Vec<&str>, Option<Micros>)> =
            inbound.iter().map(|m| (m.from.iter().map(Recipient::as_str).collect(), m.at)).collect();
        assert_eq!(
            users,
            [
                (vec!["16505551234", "US.13491208655302741918"], Some(1_700_000_000_000_000)),
                (vec!["GB.99", "447700900123"], Some(1_700_000_001_000_000)),
            ]
        );
    }

    #[test]
    fn a_throughput_upgrade_carries_a_throughput_level_and_no_limit() {
        let v = json!({"display_phone_number": "15550783881", "event": "THROUGHPUT_UPGRADE",
                       "current_limit": "TIER_UNLIMITED", "max_daily_conversations_per_business": "TIER_UNLIMITED"});
        let Some(Event::NumberQuality { event: e, limits, .. }) = event("phone_number_quality_update", &v) else {
            panic!("a quality update")
        };
        assert_eq!(e, Some(NumberEvent::Throughput { mps: Some(1_000) }));
        assert_eq!(limits, ReportedLimits::default());
    }

    #[test]
    fn an_unflagged_number_carries_the_quality_of_the_payload_when_there_is_one() {
        let quality = |v: Value| match event("phone_number_quality_update", &v) {
            Some(Event::NumberQuality { event: Some(NumberEvent::Unflagged), quality, .. }) => quality,
            other => panic!("{other:?}"),
        };
        assert_eq!(quality(json!({"event": "UNFLAGGED", "quality_rating": "GREEN"})), Some(Quality::High));
        assert_eq!(quality(json!({"event": "UNFLAGGED", "new_quality_score": "YELLOW"})), Some(Quality::Medium));
        assert_eq!(quality(json!({"event": "UNFLAGGED"})), None);
    }

    #[test]
    fn template_events_name_their_language_and_one_that_is_no_code_is_not_followed() {
        let status = |language: Value| {
            let v = json!({"event": "PAUSED", "message_template_name": "spring_sale", "message_template_language": language});
            match event("message_template_status_update", &v) {
                Some(Event::TemplateStatus { name, language, status }) => {
                    assert_eq!((name.as_str(), status.as_str()), ("spring_sale", "PAUSED"));
                    Some(language.map(TemplateLanguage::into_string))
                }
                None => None,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(status(json!("pt_BR")), Some(Some("pt_BR".into())));
        assert_eq!(status(Value::Null), Some(None), "no language: every language of the name");
        assert_eq!(status(json!("en:US")), None);
        let v = json!({"new_quality_score": "RED", "message_template_name": "spring_sale", "message_template_language": "en_US"});
        let Some(Event::TemplateQuality { language, quality, .. }) = event("message_template_quality_update", &v)
        else {
            panic!("a quality update")
        };
        assert_eq!((language.as_ref().map(TemplateLanguage::as_str), quality), (Some("en_US"), Quality::Low));
    }

    #[test]
    fn a_failed_status_carries_its_error_codes_as_numbers_or_numeric_strings() {
        let errors = json!([{"code": 131049, "title": "not delivered"}, {"code": "131056"}, {"code": "x"},
                            {"code": -1}, {"code": 1.5}, {"title": "no code"}, {"code": 4_294_967_296u64}]);
        let v = json!({"metadata": {"phone_number_id": "106540352242922"},
                       "statuses": [{"status": "failed", "recipient_id": "16505551234", "timestamp": "1700000000",
                                     "errors": errors},
                                    {"status": "failed", "recipient_id": "16505551235"},
                                    {"status": "delivered", "recipient_id": "16505551236",
                                     "errors": [{"code": 131026}]}]});
        let Some(Event::Messages { statuses, .. }) = event("messages", &v) else { panic!("messages") };
        let codes: Vec<(&str, Delivery, &[u32])> =
            statuses.iter().map(|s| (s.recipient.as_str(), s.delivery, s.errors.as_slice())).collect();
        assert_eq!(
            codes,
            [
                ("16505551234", Delivery::Failed, &[131_049, 131_056][..]),
                ("16505551235", Delivery::Failed, &[][..]),
                ("16505551236", Delivery::Delivered, &[][..]),
            ]
        );
    }

    #[test]
    fn at_most_a_few_error_codes_are_kept_of_one_status() {
        let errors: Vec<Value> = (0..1_000).map(|i| json!({"code": 131_000 + i})).collect();
        let v = json!({"metadata": {"phone_number_id": "106540352242922"},
                       "statuses": [{"status": "failed", "recipient_id": "16505551234", "errors": errors}]});
        let Some(Event::Messages { statuses, .. }) = event("messages", &v) else { panic!("messages") };
        assert_eq!(statuses[0].errors, (131_000..131_000 + MAX_STATUS_ERRORS as u32).collect::<Vec<_>>());
    }
}
