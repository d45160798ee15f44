//! The status page's HTML: pure functions from what the limiter read to one small page, with
//! inline CSS and no script. Every string that comes from configuration, a caller or a webhook
//! (ids, tier and template names, statuses, store errors) goes through [`escape`]. Nothing here
//! can show a recipient: the views hold none (the store keeps keyed hashes), and the display
//! phone numbers webhooks taught the store (`PortfolioState::aliases`) are left out.

use std::collections::BTreeSet;
use std::fmt::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::limiter::{PortfolioView, Usage};
use crate::policy::{self, Limit, SenderStatus};
use crate::store::{StoreError, TemplateKey};

/// Whether the store answers, as its ping said.
pub struct Health {
    /// `memory` or `redis`.
    pub backend: &'static str,
    /// The ping's answer: an error when the store does not answer, or (refused) when this
    /// sidecar's shared policy differs from the store's.
    pub answer: Result<(), StoreError>,
}

/// One portfolio on the page.
pub enum Portfolio {
    /// Everything the limiter read of it.
    Read(PortfolioView),
    /// A portfolio that could not be read, and why.
    Unread { id: String, why: String },
}

impl Portfolio {
    /// The portfolio's id.
    pub fn id(&self) -> &str {
        match self {
            Portfolio::Read(v) => &v.portfolio,
            Portfolio::Unread { id, .. } => id,
        }
    }
}

/// `GET /`: the store's health and each portfolio shown, of `tracked` tracked.
pub fn index(now: SystemTime, health: &Health, portfolios: &[Portfolio], tracked: usize) -> String {
    let mut body = String::new();
    let _ = write!(body, "<h2>Portfolios</h2>\n<p>{} tracked by this sidecar", grouped(tracked as u64));
    if portfolios.len() < tracked {
        let _ = write!(
            body,
            "; the first {} by id are shown, the others at <code>/portfolios/&lt;id&gt;</code>",
            portfolios.len()
        );
    }
    body.push_str(".</p>\n");
    if portfolios.len() > 1 {
        body.push_str("<nav aria-label=\"Portfolios\"><ul class=\"links\">");
        for p in portfolios {
            let _ = write!(body, "<li><a href=\"#p-{0}\">{0}</a></li>", escape(p.id()));
        }
        body.push_str("</ul></nav>\n");
    }
    for p in portfolios {
        section(&mut body, p);
    }
    page("tiergate status", now, health, &body)
}

/// `GET /portfolios/<id>`: one portfolio.
pub fn portfolio(now: SystemTime, health: &Health, portfolio: &Portfolio) -> String {
    let mut body = String::from("<p><a href=\"/\">All portfolios</a></p>\n");
    section(&mut body, portfolio);
    page(&format!("{} · tiergate status", portfolio.id()), now, health, &body)
}

/// A page that only says why there is nothing to show (unknown portfolio, missing token).
pub fn message(title: &str, text: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head><meta charset=\"utf-8\"><title>{0}</title></head>\n\
         <body><h1>{0}</h1><p>{1}</p><p><a href=\"/\">All portfolios</a></p></body>\n</html>\n",
        escape(title),
        escape(text)
    )
}

const STYLE: &str =
    "body{font:15px/1.4 system-ui,sans-serif;margin:1.5rem auto;max-width:75rem;padding:0 1rem;color:#1b1b1b}\
h1{font-size:1.5rem;margin:0}h2{font-size:1.2rem;margin:1.5rem 0 .5rem}\
header p,.muted{color:#555;margin:.2rem 0}\
table{border-collapse:collapse;margin:.5rem 0 1rem;width:100%}\
caption{text-align:left;font-weight:600;padding:.3rem 0}\
th,td{border-bottom:1px solid #ddd;padding:.35rem .6rem;text-align:left;vertical-align:top}\
thead th{background:#f3f3f3}\
meter{width:12rem;height:1rem;vertical-align:middle;margin-right:.5rem}\
ul{margin:0;padding-left:1.1rem}ul.links{display:flex;flex-wrap:wrap;gap:.3rem 1rem;list-style:none;padding:0}\
section.portfolio{border-top:2px solid #ccc;margin-top:1.5rem}\
.ok{color:#146c2e}.bad{color:#b3261e;font-weight:600}";

fn page(title: &str, now: SystemTime, health: &Health, body: &str) -> String {
    let mut out = String::with_capacity(body.len() + 2048);
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n\
         <header><h1>tiergate status</h1><p>Read at {}; reload to read again. Recipients are never shown.</p></header>\n\
         <main>\n<h2>Store</h2>\n",
        escape(title),
        time(now)
    );
    let backend = escape(health.backend);
    let _ = match &health.answer {
        Ok(()) => {
            writeln!(
                out,
                "<p id=\"store\" class=\"ok\">The {backend} store answers and shares this sidecar's policy.</p>"
            )
        }
        Err(StoreError::Refused(why)) => writeln!(
            out,
            "<p id=\"store\" class=\"bad\">The {backend} store refuses this sidecar: its shared policy differs. {}</p>",
            escape(why)
        ),
        Err(StoreError::Unavailable(why)) => {
            writeln!(out, "<p id=\"store\" class=\"bad\">The {backend} store does not answer: {}</p>", escape(why))
        }
        Err(StoreError::Internal(why)) => writeln!(
            out,
            "<p id=\"store\" class=\"bad\">The {backend} store answers with an error: {}</p>",
            escape(why)
        ),
    };
    out.push_str(body);
    out.push_str("</main>\n</body>\n</html>\n");
    out
}

/// One portfolio: usage of each scope, its numbers, the templates that block sends.
fn section(out: &mut String, portfolio: &Portfolio) {
    let id = escape(portfolio.id());
    let _ = write!(
        out,
        "<section class=\"portfolio\" id=\"p-{id}\" aria-labelledby=\"h-{id}\">\n\
         <h2 id=\"h-{id}\"><a href=\"/portfolios/{}\">{id}</a></h2>\n",
        escape(&path_segment(portfolio.id()))
    );
    match portfolio {
        Portfolio::Unread { why, .. } => {
            let _ = writeln!(out, "<p class=\"bad\">Not read: {}</p>", escape(why));
        }
        Portfolio::Read(view) => {
            usage_table(out, view);
            numbers_table(out, view);
            templates_table(out, view);
            let _ = writeln!(out, "<p class=\"muted\">Opted-out recipients: {}.</p>", grouped(view.state.opted_out));
        }
    }
    out.push_str("</section>\n");
}

fn usage_table(out: &mut String, view: &PortfolioView) {
    out.push_str(
        "<table class=\"usage\">\n<caption>Unique recipients in the rolling window, against the tier</caption>\n\
         <thead><tr><th scope=\"col\">Scope</th><th scope=\"col\">Usage</th><th scope=\"col\">Tier</th>\
         <th scope=\"col\">Next tier</th><th scope=\"col\">Quality</th><th scope=\"col\">Upgrade</th></tr></thead>\n<tbody>\n",
    );
    if view.usage.is_empty() {
        out.push_str("<tr><td colspan=\"6\">No number is known yet, so no limit scope either.</td></tr>\n");
    }
    for u in &view.usage {
        let scope = match &u.scope.sender {
            Some(s) => format!("number {}", escape(s)),
            None if view.usage.len() > 1 => "whole portfolio (business-wide limit)".to_owned(),
            None => "whole portfolio".to_owned(),
        };
        let _ = write!(out, "<tr><th scope=\"row\">{scope}</th><td>");
        usage_cell(out, u, &format!("{}, {scope}", escape(&view.portfolio)));
        let tier = escape(&u.snapshot.tier.name);
        let _ = write!(out, "</td><td>{tier}</td>");
        match &u.detail {
            Some(d) => {
                let next =
                    d.projection.next_tier.as_ref().map_or("none (top of the ladder)".to_owned(), |t| escape(&t.name));
                let _ = write!(out, "<td>{next}</td><td>{}</td><td>", d.quality.as_str());
                let p = &d.projection;
                if p.eligible {
                    let _ = write!(
                        out,
                        "<span class=\"ok\">Eligible</span>: {} of {} unique recipients in {} days",
                        grouped(p.count),
                        grouped(p.threshold),
                        p.period_days
                    );
                    if !p.delay.is_zero() {
                        let _ = write!(out, "; applied within {}", humantime::format_duration(p.delay));
                    }
                } else {
                    out.push_str("<ul class=\"blockers\">");
                    for b in &p.blockers {
                        let _ = write!(out, "<li>{}</li>", escape(b));
                    }
                    out.push_str("</ul>");
                }
                out.push_str("</td>");
            }
            None => out.push_str("<td>—</td><td>—</td><td>—</td>"),
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody>\n</table>\n");
}

/// A meter of the scope's usage against its limit, with the numbers beside it; `scope` (escaped)
/// names it for screen readers.
fn usage_cell(out: &mut String, u: &Usage, scope: &str) {
    let counted = u.snapshot.counted;
    match u.snapshot.tier.limit {
        Limit::Limited(limit) => {
            let (low, high) = (limit.saturating_mul(8) / 10, limit.saturating_mul(95) / 100);
            let _ = write!(
                out,
                "<meter min=\"0\" max=\"{limit}\" low=\"{low}\" high=\"{high}\" optimum=\"0\" value=\"{counted}\" \
                 aria-label=\"Usage of {scope}\"></meter><span class=\"count\">{} of {}</span> ({}%)",
                grouped(counted),
                grouped(limit),
                (counted.saturating_mul(100)).checked_div(limit).unwrap_or(0)
            );
            if u.restricted() {
                out.push_str(" <span class=\"bad\">full</span>");
                if let Some(at) = u.snapshot.next_slot_at {
                    let _ = write!(out, "; a slot frees at {}", time(UNIX_EPOCH + Duration::from_micros(at)));
                }
            }
        }
        Limit::Unlimited => {
            let _ = write!(out, "<span class=\"count\">{}</span> (unlimited)", grouped(counted));
        }
    }
}

fn numbers_table(out: &mut String, view: &PortfolioView) {
    let ids: BTreeSet<&String> = view.state.senders.keys().chain(&view.blocked_senders).collect();
    if ids.is_empty() {
        out.push_str("<p>No numbers known.</p>\n");
        return;
    }
    out.push_str(
        "<table class=\"numbers\">\n<caption>Numbers</caption>\n<thead><tr><th scope=\"col\">Number id</th>\
         <th scope=\"col\">Status</th><th scope=\"col\">Quality</th><th scope=\"col\">Status since</th>\
         <th scope=\"col\">Blocked by configuration</th></tr></thead>\n<tbody>\n",
    );
    for id in ids {
        let state = view.state.senders.get(id);
        let status = view.sender_status(id);
        let quality = state.map_or("UNKNOWN", |s| s.quality.as_str());
        let since =
            state.and_then(|s| s.since).map_or("—".to_owned(), |t| time(UNIX_EPOCH + Duration::from_micros(t)));
        let blocked = if view.blocked_senders.contains(id) { "<span class=\"bad\">yes</span>" } else { "no" };
        let class = match status {
            SenderStatus::Connected => "ok",
            SenderStatus::Flagged | SenderStatus::Restricted | SenderStatus::Banned => "bad",
            SenderStatus::Pending | SenderStatus::Offline => "",
        };
        let _ = writeln!(
            out,
            "<tr><th scope=\"row\">{}</th><td class=\"{class}\">{}</td><td>{quality}</td><td>{since}</td><td>{blocked}</td></tr>",
            escape(id),
            status.as_str()
        );
    }
    out.push_str("</tbody>\n</table>\n");
}

fn templates_table(out: &mut String, view: &PortfolioView) {
    let templates = &view.state.templates;
    let blocking: Vec<_> = templates
        .iter()
        .filter_map(|(key, t)| {
            let every_language = templates.get(&TemplateKey::new(&key.name, "")).and_then(|t| t.event());
            let status = policy::template_status_in_force(t.event(), every_language);
            (!policy::template_active(status)).then(|| (key, status.unwrap_or_default(), t.quality))
        })
        .collect();
    if blocking.is_empty() {
        out.push_str("<p>No template blocks sends.</p>\n");
        return;
    }
    out.push_str(
        "<table class=\"templates\">\n<caption>Templates that block sends</caption>\n<thead><tr>\
         <th scope=\"col\">Template</th><th scope=\"col\">Language</th><th scope=\"col\">Status</th>\
         <th scope=\"col\">Quality</th></tr></thead>\n<tbody>\n",
    );
    for (key, status, quality) in blocking {
        let language = if key.language.is_empty() { "every language".to_owned() } else { escape(&key.language) };
        let _ = writeln!(
            out,
            "<tr><th scope=\"row\">{}</th><td>{language}</td><td class=\"bad\">{}</td><td>{}</td></tr>",
            escape(&key.name),
            escape(status),
            quality.as_str()
        );
    }
    out.push_str("</tbody>\n</table>\n");
}

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a path segment: every byte outside `[A-Za-z0-9_.~-]`.
fn path_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"_.~-".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// `1234567` as `1,234,567`.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A time to the second, in UTC: `2025-10-07 14:03:09 UTC`.
fn time(at: SystemTime) -> String {
    let rfc3339 = humantime::format_rfc3339_seconds(at).to_string();
    format!("{} UTC", rfc3339.trim_end_matches('Z').replacen('T', " ", 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{ScopeKey, Tier};
    use crate::store::{PortfolioState, SenderState, UsageSnapshot};

    fn view() -> PortfolioView {
        let mut state = PortfolioState::default();
        state.senders.insert("1001".into(), SenderState::default());
        state.aliases.insert("+1 987 654 3210".into(), "1001".into());
        PortfolioView {
            portfolio: "acme".into(),
            state,
            blocked_senders: ["\"><i>x".to_owned()].into(),
            mode: crate::policy::Mode::Enforce,
            throughput_mps: [("1001".to_owned(), 80)].into(),
            usage: vec![Usage {
                scope: ScopeKey { portfolio: "acme".into(), sender: None },
                snapshot: UsageSnapshot { tier: Tier::limited("TIER_<250>", 250), counted: 250, next_slot_at: None },
                detail: None,
            }],
        }
    }

    #[test]
    fn everything_from_outside_is_escaped_and_display_numbers_are_left_out() {
        let health = Health { backend: "memory", answer: Err(StoreError::Refused("a <differs>".into())) };
        let html = portfolio(UNIX_EPOCH, &health, &Portfolio::Read(view()));
        assert!(html.contains("TIER_&lt;250&gt;") && html.contains("&quot;&gt;&lt;i&gt;x"), "{html}");
        assert!(html.contains("its shared policy differs. a &lt;differs&gt;"), "{html}");
        assert!(!html.contains("<i>") && !html.contains("<differs>"), "{html}");
        assert!(!html.contains("987") && !html.contains("3210"), "a display number is shown: {html}");
        assert!(html.contains("<th scope=\"row\">1001</th><td class=\"bad\">RESTRICTED</td>"), "{html}");
        assert!(html.contains("Read at 1970-01-01 00:00:00 UTC"), "{html}");
        let unread = Portfolio::Unread { id: "<x>".into(), why: "a & b".into() };
        let html = index(UNIX_EPOCH, &health, &[unread], 7);
        assert!(html.contains("id=\"p-&lt;x&gt;\"") && html.contains("href=\"/portfolios/%3Cx%3E\""), "{html}");
        assert!(html.contains("Not read: a &amp; b") && html.contains("the first 1 by id are shown"), "{html}");
    }

    #[test]
    fn numbers_are_grouped_and_path_segments_encoded() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1_000), "1,000");
        assert_eq!(grouped(100_000), "100,000");
        assert_eq!(grouped(1_234_567), "1,234,567");
        assert_eq!(path_segment("acme-1_x.y~"), "acme-1_x.y~");
        assert_eq!(path_segment("a:b/c d"), "a%3Ab%2Fc%20d");
        assert_eq!(escape("<a href='x'>&\"</a>"), "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;");
    }
}
