//! Realistic support tickets, deterministic from a seed.

/// One generated ticket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GeneratedTicket {
    /// The subject line.
    pub subject: String,
    /// The customer's message.
    pub body: String,
    /// Who wrote in.
    pub customer: String,
    /// The category a careful classifier would choose.
    pub category: &'static str,
}

struct Template {
    category: &'static str,
    subjects: &'static [&'static str],
    bodies: &'static [&'static str],
}

const TEMPLATES: &[Template] = &[
    Template {
        category: "billing",
        subjects: &[
            "Charged twice for {month}",
            "Refund for cancelled plan",
            "Invoice {order} shows the wrong VAT number",
            "Why did my price go up?",
        ],
        bodies: &[
            "Hello, my card was charged twice for the {month} invoice (order {order}). Please refund one of them.",
            "I cancelled my subscription on the 3rd but was still billed for {month}. Can I get the money back?",
            "Our accounting needs invoice {order} reissued with our VAT number. The current one is missing it.",
        ],
    },
    Template {
        category: "outage",
        subjects: &[
            "Dashboard down for the whole team",
            "API returns 503 since {time}",
            "Cannot reach the EU region",
            "Webhooks stopped arriving",
        ],
        bodies: &[
            "Since about {time} every request to the API returns 503. This blocks our checkout. Status page says all green.",
            "None of us can open the dashboard; it spins forever. Tried three browsers and two networks.",
            "Our webhook endpoint has received nothing since {time}, but orders keep coming in.",
        ],
    },
    Template {
        category: "account_access",
        subjects: &[
            "Locked out after password reset",
            "2FA codes not accepted",
            "Reset link expired twice",
            "Need to transfer account ownership",
        ],
        bodies: &[
            "I reset my password and now the login says my account is locked. I have a demo with a client at {time}.",
            "My authenticator codes are rejected every time. The phone clock is correct.",
            "The owner of our account left the company. How do we move ownership to me?",
        ],
    },
    Template {
        category: "bug",
        subjects: &[
            "CSV export drops rows with commas",
            "Search ignores accented letters",
            "Timezone wrong on scheduled reports",
            "App crashes when attaching a PDF",
        ],
        bodies: &[
            "Exporting order {order} to CSV loses every line whose note contains a comma. Looks like quoting is off.",
            "Searching for 'Müller' finds nothing, 'Muller' finds the customer. Expected both to work.",
            "Reports scheduled for 9:00 arrive at 10:00 since the clocks changed.",
        ],
    },
    Template {
        category: "feature_request",
        subjects: &[
            "Please add SSO with Okta",
            "Bulk edit for tags",
            "Dark mode?",
            "Export to Parquet",
        ],
        bodies: &[
            "We are rolling out Okta company-wide and would love SSO support. Is it on the roadmap?",
            "Editing tags one order at a time takes us hours each week. A bulk edit would save a lot.",
            "Our analysts would like Parquet exports instead of CSV for the nightly dumps.",
        ],
    },
    Template {
        category: "other",
        subjects: &[
            "Partnership inquiry",
            "Question about your security audit",
            "Thank you!",
        ],
        bodies: &[
            "We run a logistics startup and would like to talk about an integration partnership.",
            "Could you share your latest SOC 2 report? Our procurement asks for it.",
            "Just wanted to say the new release fixed everything for us. Thanks!",
        ],
    },
];

const MONTHS: &[&str] = &["January", "February", "March", "April", "May", "June"];
const TIMES: &[&str] = &["08:10 UTC", "09:45 UTC", "13:20 UTC", "17:05 UTC"];
const NAMES: &[&str] = &[
    "dana", "li", "omar", "sofia", "ken", "ines", "tom", "amara", "jonas", "priya",
];
const DOMAINS: &[&str] = &["example.com", "shop.example", "acme.test", "mail.example.org"];

/// Generates `count` tickets from `seed`; the same seed always gives the
/// same tickets.
pub fn generate(count: usize, seed: u64) -> Vec<GeneratedTicket> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..count)
        .map(|_| {
            let template = &TEMPLATES[rng.usize(0..TEMPLATES.len())];
            let order = format!("#{}", rng.u32(10_000..99_999));
            let fill = |text: &str, rng: &mut fastrand::Rng| {
                text.replace("{month}", MONTHS[rng.usize(0..MONTHS.len())])
                    .replace("{order}", &order)
                    .replace("{time}", TIMES[rng.usize(0..TIMES.len())])
            };
            let subject = fill(template.subjects[rng.usize(0..template.subjects.len())], &mut rng);
            let body = fill(template.bodies[rng.usize(0..template.bodies.len())], &mut rng);
            let customer = format!(
                "{}@{}",
                NAMES[rng.usize(0..NAMES.len())],
                DOMAINS[rng.usize(0..DOMAINS.len())]
            );
            GeneratedTicket {
                subject,
                body,
                customer,
                category: template.category,
            }
        })
        .collect()
}

/// A plausible draft reply for a ticket.
pub fn draft_for(ticket: &GeneratedTicket) -> String {
    let greeting = ticket.customer.split('@').next().unwrap_or("there");
    let body = match ticket.category {
        "billing" => {
            "we checked your billing history and corrected the charge; the refund shows within 5 business days."
        }
        "outage" => "our engineers confirmed the incident and deployed a fix; please tell us if anything still fails.",
        "account_access" => "we verified your identity and unlocked the account; a new sign-in link is on its way.",
        "bug" => "thanks for the precise report; we reproduced it and a fix ships in the next release.",
        "feature_request" => {
            "thank you for the suggestion; we added your vote to the request and will keep you posted."
        }
        _ => "thank you for writing; the right team will follow up with you shortly.",
    };
    format!("Hi {greeting}, {body}\n\nBest regards,\nSupport")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_tickets() {
        assert_eq!(generate(50, 7), generate(50, 7));
        assert_ne!(generate(50, 7), generate(50, 8));
    }

    #[test]
    fn tickets_vary_across_categories_and_fill_every_placeholder() {
        let tickets = generate(300, 1);
        let categories: std::collections::BTreeSet<_> = tickets.iter().map(|t| t.category).collect();
        assert_eq!(categories.len(), TEMPLATES.len());
        for ticket in &tickets {
            assert!(
                !ticket.subject.contains('{') && !ticket.body.contains('{'),
                "{ticket:?}"
            );
            assert!(ticket.customer.contains('@'));
            assert!(!draft_for(ticket).is_empty());
        }
        let subjects: std::collections::BTreeSet<_> = tickets.iter().map(|t| &t.subject).collect();
        assert!(subjects.len() > 40, "only {} distinct subjects", subjects.len());
    }
}
