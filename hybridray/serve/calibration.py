"""Fixed texts that quantized models are checked on against their fp32 originals.

Varied on purpose (short and long, prose, questions, code, numbers, other languages, the
vocabulary of this project) so one kind of input cannot hide an accuracy loss on another.
Kept small enough that the check costs well under a second per model on one CPU core.
"""

from __future__ import annotations

SENTENCES: tuple[str, ...] = (
    "hello",
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France?",
    "Ray Serve scales model serving across many machines.",
    "Restricted data must stay on premises; public data may be processed anywhere.",
    "A replica was lost when the spot instance was reclaimed, and traffic moved to the "
    "other region within seconds.",
    "def add(a, b):\n    return a + b",
    "SELECT name, total FROM orders WHERE total > 100 ORDER BY total DESC;",
    "1234 5678 9012 3456",
    "The invoice of 2024-03-14 totals 1,299.00 EUR including VAT.",
    "Résumé, café and naïve keep their accents.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "El aprendizaje automático necesita datos limpios.",
    "My package arrived broken and customer support has not answered in a week.",
    "Thanks, the replacement works perfectly!",
    "How do I reset my password if I no longer have access to my email?",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The mitochondria is the powerhouse of the cell.",
    "Interest rates rose by a quarter point, the third increase this year.",
    "Patients with type 2 diabetes were randomised to the new treatment or placebo.",
    "The court ruled that the contract was void because one party lacked capacity.",
    "Once upon a time, in a kingdom by the sea, there lived a lonely lighthouse keeper.",
    "Gradient checkpointing trades compute for memory by recomputing activations.",
    "int8 dynamic quantization stores weights in eight bits and quantizes activations "
    "on the fly.",
    "Cosine similarity measures the angle between two vectors, not their length.",
    "Please schedule the meeting for Tuesday at 3 pm in room 204.",
    "The train to Amsterdam is delayed by twenty minutes.",
    "Error: connection refused (ECONNREFUSED) at 10.0.0.12:5432",
    "Kubernetes restarts containers that fail their liveness probe.",
    "An embedding maps a sentence to a point in a space where similar meanings are close.",
    "Bake at 180 degrees for 25 minutes, until golden brown.",
    "ok",
    "The board approved the merger after a long debate about the valuation, the "
    "integration plan, the treatment of employees in both companies and the regulatory "
    "risks in three jurisdictions, asking management to report back every quarter.",
    "?",
    "New York, Tokyo, Lagos, São Paulo, Mumbai",
    "Is it going to rain tomorrow afternoon?",
)

# Held-out prose for language-model perplexity (byte-level models read it as bytes).
PROSE = (
    "The lighthouse keeper climbed the stairs every evening to light the lamp. Ships "
    "passing in the night could see it from far away, and the sailors knew they were "
    "close to home. In winter the storms were strong and the waves broke over the rocks, "
    "but the light never went out. Years later, when the lamp was replaced by an "
    "automatic one, the keeper moved to the village and told children stories about the "
    "sea, the ships and the long nights alone with the wind. "
    "Data that is restricted must stay inside the building, while public data may be "
    "sent anywhere. A model trained on restricted data is itself restricted, so it may "
    "only be served where that class is allowed."
)
