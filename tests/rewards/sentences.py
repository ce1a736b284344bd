"""A fixed list of sentences written by hand for the reward tests.

Half are plainly insulting, half plainly kind. They were written once, before any reward
was run on them, and are not tuned to any scorer. Each list has 24 sentences.
"""

INSULTING: list[str] = [
    "You are a stupid, worthless idiot.",
    "Shut up, nobody cares what a moron like you thinks.",
    "You're the dumbest person I have ever met.",
    "Get lost, you pathetic loser.",
    "What a useless piece of garbage you are.",
    "You are an ugly, disgusting slob.",
    "Only a complete fool would write something this dumb.",
    "You're a lying, cheating bastard.",
    "Go away, you annoying little jerk.",
    "Your work is crap and you are an idiot.",
    "You are so stupid it hurts to read your messages.",
    "Nobody likes you, you miserable creep.",
    "Stop talking, you brainless clown.",
    "You are a disgrace and a total failure.",
    "What kind of idiot thinks like that?",
    "You stink, you filthy pig.",
    "You're a pathetic, spineless coward.",
    "Everything you say is stupid nonsense, you fool.",
    "Damn it, you ruined everything, you incompetent jerk.",
    "You are a hateful, rotten person and I despise you.",
    "Shut your mouth, you ignorant dumbass.",
    "You're nothing but a worthless, lazy bum.",
    "Screw you and your idiotic ideas.",
    "You are the most annoying, dumb person alive.",
]

KIND: list[str] = [
    "Thank you so much for your help today.",
    "You did a wonderful job on this project.",
    "I really appreciate your kindness and patience.",
    "It was lovely to see you, have a great weekend.",
    "Your presentation was clear and very helpful.",
    "I am so grateful to have a friend like you.",
    "Congratulations on your new job, you deserve it!",
    "What a beautiful drawing, I love the colours.",
    "Thanks for listening, it means a lot to me.",
    "You are always so generous and thoughtful.",
    "I hope you feel better soon, take care.",
    "Your garden looks beautiful this spring.",
    "It is a pleasure working with such a great team.",
    "Welcome to the neighbourhood, we are happy you are here.",
    "Great idea, let's try it together.",
    "I admire how hard you work and how much you care.",
    "Thank you for the delicious dinner, it was perfect.",
    "You have a wonderful sense of humour.",
    "I'm proud of you and everything you have achieved.",
    "Have a lovely day and enjoy the sunshine.",
    "Your advice really helped me, thank you.",
    "The children loved your story, it made them smile.",
    "You are a kind and caring person.",
    "Best wishes for a happy and healthy new year.",
]
