//! Builders for the Limiter's protobuf requests, so a test spells out only what it is about.
//!
//! An [`Admit`] is what is sent (category and template); [`Admit::to`] says from where and to
//! whom. A test file that sends one kind of message names it once:
//!
//! ```ignore
//! const SALE: Admit = MARKETING.template("spring_sale");
//! client.admit(SALE.to("acme", "sender-1", "+15550000001")).await
//! ```

use tiergate::pb;

/// The message an Admit asks about: its category, template and template language (empty for
/// none).
#[derive(Clone, Copy, Debug)]
pub struct Admit {
    category: pb::Category,
    template: &'static str,
    language: &'static str,
}

/// A utility message without a template.
pub const UTILITY: Admit = Admit::new(pb::Category::Utility);
/// A marketing message without a template.
pub const MARKETING: Admit = Admit::new(pb::Category::Marketing);
/// An authentication (one-time password) message without a template.
pub const AUTHENTICATION: Admit = Admit::new(pb::Category::Authentication);
/// A free-form service message (a reply), without a template.
pub const SERVICE: Admit = Admit::new(pb::Category::Service);

impl Admit {
    /// A message of this category, without a template.
    pub const fn new(category: pb::Category) -> Admit {
        Admit { category, template: "", language: "" }
    }

    /// The same message sent with this template.
    pub const fn template(self, name: &'static str) -> Admit {
        Admit { template: name, ..self }
    }

    /// The same message with its template in this language (e.g. `en_US`).
    pub const fn language(self, language: &'static str) -> Admit {
        Admit { language, ..self }
    }

    /// The AdmitRequest for sending this message in `portfolio` from `sender` (empty for none)
    /// to `recipient`.
    pub fn to(self, portfolio: &str, sender: &str, recipient: &str) -> pb::AdmitRequest {
        pb::AdmitRequest {
            portfolio_id: portfolio.into(),
            sender_id: sender.into(),
            recipient: recipient.into(),
            category: self.category.into(),
            template: self.template.into(),
            template_language: self.language.into(),
            idempotency_key: String::new(),
            max_wait: None,
        }
    }

    /// [`Admit::to`] with an idempotency key, for a send that may be retried.
    pub fn keyed(self, portfolio: &str, sender: &str, recipient: &str, key: &str) -> pb::AdmitRequest {
        pb::AdmitRequest { idempotency_key: key.into(), ..self.to(portfolio, sender, recipient) }
    }
}

/// GetUsage of a scope (`sender` empty for the whole portfolio).
pub fn usage(portfolio: &str, sender: &str) -> pb::GetUsageRequest {
    pb::GetUsageRequest { portfolio_id: portfolio.into(), sender_id: sender.into() }
}

/// SetTier of a scope (`sender` empty for the whole portfolio).
pub fn set_tier(portfolio: &str, sender: &str, tier: &str) -> pb::SetTierRequest {
    pb::SetTierRequest { portfolio_id: portfolio.into(), sender_id: sender.into(), tier: tier.into() }
}

/// RecordInbound: `recipient` wrote to `sender`.
pub fn inbound(portfolio: &str, sender: &str, recipient: &str) -> pb::RecordInboundRequest {
    pb::RecordInboundRequest { portfolio_id: portfolio.into(), sender_id: sender.into(), recipient: recipient.into() }
}

/// GetPortfolio.
pub fn portfolio(id: &str) -> pb::GetPortfolioRequest {
    pb::GetPortfolioRequest { portfolio_id: id.into() }
}
