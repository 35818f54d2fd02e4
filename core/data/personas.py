"""The persona world: everyday requests, styled responses, gold scorers and archetype users.

A small, fully synthetic, deterministic-by-seed world for steerable alignment:

- **Requests.** 385 everyday requests ("How do I get better sleep?") over 55 topics, written
  for this project. Each topic carries a goal ("sleep better") and eight concrete tips, each
  with a short reason, so that responses are on-topic and differ in content across topics.
- **Responses.** `render_response(request, style, rng)` writes a natural-English answer at a
  point of the behaviour square, one coordinate per axis in [-1, 1]:
    * `verbosity`: terse (-1: one short sentence or two, ~8-25 words) to thorough (+1: an
      opener, an intro, several tips with reasons, a summary and a closer, ~60-125 words);
    * `tone`: formal (-1: "Certainly.", "It is advisable to ...", no contractions, no "!")
      to warm and casual (+1: "Hey!", "you'll", "honestly", "!", "Hope that helps!").
  Intermediate values give intermediate answers: a target word count grows smoothly
  (log-linearly) with verbosity and parts are added in a priority order until it is met;
  every phrasing slot (opener, intro, frame of each tip, connective, reason, summary, closer)
  picks the formal, neutral or casual register with probabilities ((1-t)/2)², rest,
  ((1+t)/2)² (spread evenly over the slots of one response by a golden-ratio sequence, so
  a short answer's mix still tracks t); outside formal sentences, contractible forms are
  contracted with probability (1+t)/2 and full stops become "!" with probability max(t, 0)/4.
  Tips are shuffled, phrases are not repeated within a response, and each register has
  10-40 phrasings per slot.
  (A third axis, hedging, is left out on purpose: its lexical cues — "may", "might",
  "perhaps", "it is possible" — overlap with the formal register and cannot be scored
  robustly on free-form model output.)
- **Gold scorers.** `score_verbosity`, `score_tone` and `score_all` are pure functions of text,
  built to score free-form LM output too (markdown lists, emoji, one-liners): verbosity is
  tanh(1.4 · ln(words / 37)), so 15 words ≈ -0.85, 37 words = 0 and 90 words ≈ +0.85; tone
  is tanh(12.5 · (casual − formal) / (words + 10)), a length-normalised balance of weighted
  lexical cues (contractions, "!", emoji, slang vs uncontracted forms, "furthermore",
  "it is advisable", "one should", ...).
- **Users.** Four archetypes at the corners of the square (`ARCHETYPES`) and continuous users
  (any weight vector over `AXES`). A user's utility for a response is w · s, where s are the
  *gold scores of the rendered text* (rounded to 4 decimals, exactly the `attributes` written
  to the pairs file), not the style used to render it: the file's continuous users (the
  task sampler's w · attributes) and its archetype choices then follow the same model.
  Choices are Bradley-Terry-Luce: P(prefer b) = sigmoid((u_b − u_a) / temperature); a
  temperature of 0 picks the larger utility (0.5 on an exact tie).
- **Conflict.** Archetypes with opposite weights (busy executive vs friendly tutor) disagree
  on every pair that is not a tie, so the conflict rate is defined on archetypes opposed on
  one axis and agreeing on the other (`opposite_pairs(axis)`, by default the verbosity axis:
  busy executive vs thorough analyst, casual texter vs friendly tutor). With weights in
  {±1}² both such pairs disagree exactly when |Δ verbosity| > |Δ tone| between the two
  responses. `generate_pairs` marks round(conflict_rate · n) pairs as conflicting and
  re-draws each pair's two styles until the gold scores satisfy the wanted relation with a
  margin (so no archetype faces a near tie).

Everything is a pure function of `PersonaConfig.seed`: splits (by request, so all pairs of
a request land in one split), styles, phrasings and BTL draws use independent numpy streams
keyed by (seed, purpose, request, pair).

CLI: `python -m core.data.personas --out FILE [--seed N --pairs-per-request K --conflict R
--temperature T]` writes the JSONL pairs file and prints split sizes and conflict rates.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
import zlib
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from core.data.pairs import SPLITS, PairSet, pairs_from_records, write_pairs

AXES: tuple[str, ...] = ("verbosity", "tone")

ARCHETYPES: dict[str, tuple[float, ...]] = {
    "busy executive": (-1.0, -1.0),  # terse + formal
    "thorough analyst": (1.0, -1.0),  # thorough + formal
    "casual texter": (-1.0, 1.0),  # terse + warm
    "friendly tutor": (1.0, 1.0),  # thorough + warm
}

ARCHETYPE_BLURBS: dict[str, str] = {
    "busy executive": "wants the answer in one line, stated formally",
    "thorough analyst": "wants the full picture with reasons, stated formally",
    "casual texter": "wants a quick, friendly reply",
    "friendly tutor": "wants a warm, detailed walk-through",
}


def _axis_index(axis: str) -> int:
    try:
        return AXES.index(axis)
    except ValueError:
        raise ValueError(f"unknown axis {axis!r}; expected one of {AXES}") from None


def opposite_pairs(axis: str = "verbosity") -> list[tuple[str, str]]:
    """Archetype pairs with opposite weights on `axis` and equal weights on every other axis.

    These are the pairs whose disagreement `PersonaConfig.conflict_rate` controls when
    `conflict_axis == axis`. (Archetypes with fully opposite weights, e.g. busy executive and
    friendly tutor, disagree on every non-tied pair; see `DIAGONAL_PAIRS`.)
    """
    k = _axis_index(axis)
    names = list(ARCHETYPES)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            wa, wb = ARCHETYPES[a], ARCHETYPES[b]
            if wa[k] == -wb[k] != 0 and all(wa[j] == wb[j] for j in range(len(AXES)) if j != k):
                out.append((a, b) if wa[k] < wb[k] else (b, a))
    return out


OPPOSITE_PAIRS: tuple[tuple[str, str], ...] = tuple(opposite_pairs("verbosity"))
DIAGONAL_PAIRS: tuple[tuple[str, str], ...] = (("busy executive", "friendly tutor"),
                                               ("casual texter", "thorough analyst"))


# ---------------------------------------------------------------------------------------------
# Requests: topics with a goal, requests and tips ("tip | reason"). Written for this project.
# Tips are imperative verb phrases in plain, tone-neutral words (no formal or casual cue words),
# so the register of a response comes from its frames, not from its content.
# ---------------------------------------------------------------------------------------------

_TOPICS_TEXT = """
## sleep | sleep better
? How do I get better sleep?
? What can I do to fall asleep faster?
? I wake up tired every morning. What should I change?
? How can I fix my sleep schedule?
? What are good habits for a good night's sleep?
? Any advice for sleeping better on work nights?
? How can I stop lying awake at night?
- keep the same bedtime and wake-up time every day | your body learns when to wind down and when to wake up
- put your phone away an hour before bed | bright screens keep your mind alert
- keep the bedroom dark, quiet and a little cool | a calm room makes it easier to drift off
- skip coffee and tea after lunch | caffeine can stay in your body for many hours
- get some daylight in the morning | morning light helps set your body clock
- write down tomorrow's tasks before bed | a clear list stops your mind from racing
- avoid heavy meals late in the evening | a full stomach can keep you awake
- get up and read for a while if you cannot sleep | lying in bed frustrated makes it harder to relax

## hiking | get ready for a hike
? What should I pack for a weekend hike?
? What do I need for my first day hike?
? How do I prepare for a long hike?
? What gear should I bring on a hiking trip?
? Any tips for packing a small hiking backpack?
? What are the essentials for a hike in the hills?
? How should I get ready for a hike this weekend?
- bring more water than you think you will need | you lose a lot of water on steep trails
- wear shoes that you have already broken in | new boots often cause blisters
- pack a light rain jacket | the weather can change quickly in the hills
- carry a map and a charged phone | trail signs are easy to miss
- take a few salty snacks | they keep your energy up and replace lost salt
- tell someone where you are going | someone will know to look for you if you are late
- pack a small first aid kit with bandages | small cuts and blisters are common on the trail
- check the forecast the night before | you can change your plans before you set off

## groceries | spend less on groceries
? How can I save money on groceries?
? What are easy ways to cut my food bill?
? How do I shop for food on a tight budget?
? Any tips for cheaper grocery shopping?
? How can I stop overspending at the supermarket?
? What is the best way to feed a family on a budget?
? How do I make my weekly food shop cheaper?
- plan your meals for the week before you shop | you only buy what you will actually use
- shop with a list and stick to it | impulse buys add up fast
- buy store brands instead of big names | they are often as good and much cheaper
- eat something before you go shopping | hunger makes everything look tempting
- buy rice, beans and oats in bulk | dry staples last for months and cost little per meal
- check the freezer and cupboards first | you may already have what you need
- choose fruit and vegetables that are in season | they are fresher and cheaper
- cook extra and eat the leftovers for lunch | one cooking session covers two meals

## languages | learn a new language
? How do I start learning a new language?
? What is the fastest way to learn Spanish?
? How can I learn a language on my own?
? Any tips for remembering new words in a foreign language?
? How do I keep up with language practice every day?
? What helps adults pick up a second language?
? How can I get better at speaking a language I am learning?
- practice for fifteen minutes every day | short daily sessions beat one long weekly session
- learn the most common words first | a few hundred words cover most daily talk
- speak out loud from the first week | your mouth needs practice as much as your brain
- watch shows you like with subtitles | you hear real speech in a relaxed way
- find a partner to chat with once a week | real conversations show you what you still need
- use flash cards that repeat old words | seeing a word again right before you forget it makes it stick
- label things around your home | you see the words many times a day
- treat mistakes as part of learning | mistakes are how you learn what sounds right

## studying | stay focused while studying
? How can I focus better when I study?
? I get distracted while studying. What can I do?
? What are good ways to concentrate on homework?
? How do I stop checking my phone while I study?
? Any tips for studying for long hours?
? How can I make my study sessions more productive?
? What helps with concentration before an exam?
- put your phone in another room | out of sight really does mean out of mind
- work in blocks of twenty-five minutes with short breaks | your attention stays fresh for longer
- set one clear goal for each session | you know exactly what done looks like
- study at the same desk each day | your brain links that spot with work
- keep water and a snack nearby | you will not need to get up as often
- test yourself instead of rereading notes | recalling facts makes them stick much better
- start with the hardest task | your energy is highest at the start
- clear your desk before you begin | a clear space helps keep a clear mind

## running | get started with running
? How do I start running as a beginner?
? What is a good way to get into jogging?
? How can I run longer without getting so tired?
? Any tips for my first month of running?
? How do I build a running habit?
? What should a new runner know?
? How can I start jogging without hurting myself?
- mix running and walking at first | your body needs time to get used to the impact
- run at a pace where you can still talk | an easy pace builds fitness without wearing you out
- add only a little distance each week | slow progress helps you avoid injury
- get a pair of good running shoes | good shoes protect your knees and feet
- rest at least one day between runs | your muscles grow stronger while they recover
- warm up with a few minutes of brisk walking | warm muscles are less likely to strain
- run at the same times each week | a fixed slot makes the habit easier to keep
- track your runs in a simple log | seeing progress keeps you going

## cooking | cook better meals at home
? How can I get better at cooking?
? What are some tips for a beginner cook?
? How do I make home cooking taste better?
? I only know how to make pasta. How do I improve?
? What should every new cook learn first?
? How can I cook tasty meals without much skill?
? Any advice for someone learning to cook?
- learn to use salt well | the right amount of salt brings out other flavors
- keep your knives sharp | a sharp knife is safer and faster than a blunt one
- read the whole recipe before you start | you avoid surprises halfway through
- prepare all your ingredients first | cooking goes smoothly when everything is ready
- taste the food as you cook | you can fix the flavor before it is too late
- let the pan heat up before adding food | a hot pan browns food instead of steaming it
- master a few simple dishes first | small wins build skill and confidence
- add a squeeze of lemon at the end | a little acid makes flavors brighter

## houseplants | keep your houseplants healthy
? How do I keep my houseplants alive?
? Why do my indoor plants keep dying?
? What are good tips for caring for houseplants?
? How often should I water my plants?
? How can I help my indoor plants grow?
? What do beginners get wrong with houseplants?
? How do I look after plants in a small apartment?
- water only when the top of the soil feels dry | too much water is the most common way plants die
- use pots with holes in the bottom | extra water needs a way to drain out
- place each plant where it gets the right light | some plants need sun while others prefer shade
- wipe dust off the leaves now and then | clean leaves take in more light
- turn the pots a little every week | the plant grows evenly instead of leaning
- feed them lightly in spring and summer | that is when plants grow the most
- check under the leaves for pests | small bugs are easier to deal with early
- start with hardy plants like snake plants | they forgive a missed watering

## interviews | do well in a job interview
? How do I prepare for a job interview?
? What should I do before an interview tomorrow?
? Any tips for doing well in an interview?
? How can I feel less nervous in job interviews?
? What do interviewers like to hear?
? How should I get ready for my first interview?
? How do I make a good impression in an interview?
- read about the company before the day | you can show real interest in their work
- practice answers to common questions out loud | saying them aloud makes them flow better
- prepare two or three short stories about your work | examples are more convincing than claims
- plan your route and arrive ten minutes early | rushing makes you nervous
- bring a few questions of your own | it shows that you are curious and engaged
- dress a little smarter than the daily dress code | it shows that you take the meeting seriously
- keep your answers short and clear | long answers can lose the listener
- send a short thank-you note afterwards | it leaves a good final impression

## public speaking | feel calmer when speaking in public
? How can I get over my fear of public speaking?
? How do I give a good presentation?
? What helps with nerves before a speech?
? Any tips for speaking in front of a group?
? How can I sound more confident when I present?
? I have to give a talk next week. How should I prepare?
? How do I stop shaking when I speak in public?
- practice the talk out loud several times | the words come more easily when you have said them before
- know your opening lines by heart | a strong start calms your nerves
- take a few slow breaths before you begin | slow breathing steadies your heart rate
- look at friendly faces in the room | it makes the room feel smaller
- use short notes instead of a full script | you can speak naturally instead of reading
- slow down when you talk | nerves make most people speak too fast
- pause after key points | a pause gives people time to take in what you said
- record yourself once and watch it back | you spot habits you did not notice

## budgeting | stick to a budget
? How do I make a budget and stick to it?
? What is a simple way to manage my money?
? How can I stop running out of money before payday?
? Any tips for budgeting for the first time?
? How do I keep track of my spending?
? How can I save a bit of money each month?
? What is a good way to plan my monthly spending?
- write down everything you spend for a month | you cannot fix what you do not see
- pay your bills first on payday | the must-haves are covered before anything else
- move some money to savings as soon as you are paid | money you do not see is easier not to spend
- set a weekly limit for eating out and treats | small limits are easier to keep than big ones
- cancel subscriptions you rarely use | they quietly drain your account every month
- keep a small fund for surprise costs | a broken phone will not wreck your whole plan
- use cash for daily spending | handing over notes makes spending feel more real
- check your budget every Sunday | small problems are easier to fix early

## cleaning | keep your home clean
? How do I keep my house clean without spending all day on it?
? What are some easy cleaning habits?
? How can I keep a tidy home when I am busy?
? Any tips for cleaning a messy apartment?
? How often should I clean different parts of my home?
? How do I stop my place from getting so messy?
? What is a good cleaning routine for a small home?
- spend ten minutes tidying every evening | small daily efforts stop mess from piling up
- clean as you cook | the kitchen is nearly clean by the time you eat
- give everything a fixed place | it is easy to put things away when they have a home
- wipe the bathroom sink after you use it | it takes seconds and keeps grime from building up
- do one bigger task each day | the work is spread across the week
- keep cleaning supplies where you use them | you are more likely to clean if the spray is close
- work from top to bottom | dust falls onto places you have not cleaned yet
- put on music while you clean | the time passes faster

## moving | move to a new home smoothly
? How do I make moving house less stressful?
? What should I do before moving to a new apartment?
? Any tips for packing up my home?
? How can I get organized for a big move?
? What do people forget when moving house?
? How do I plan a move on a tight schedule?
? What is the easiest way to pack for a move?
- start packing the rooms you use least | you can live normally for longer
- label each box with its room and contents | unpacking goes much faster
- pack a bag with things for the first night | you will not have to dig through boxes
- give away things you no longer use | there is less to pack and carry
- book movers or a van early | good dates fill up quickly
- take photos of cables before unplugging devices | setting them up again is easier
- update your address with the bank and post office | important letters will reach you
- keep heavy items in small boxes | big boxes of books are too hard to lift

## time management | manage your time better
? How can I manage my time better?
? I never have enough time in the day. What can I do?
? What are good ways to plan my day?
? How do I get more done at work?
? Any tips for staying on top of a busy schedule?
? How can I stop wasting time?
? How should I organize my week?
- write a list of three main tasks each morning | a short list keeps you focused on what matters
- do the most important task first | your energy and focus are highest early
- block time in your calendar for deep work | protected time is less likely to be taken
- group small tasks like emails together | switching between tasks wastes time
- say no to things that do not fit your goals | every yes uses time you cannot get back
- set a time limit for each task | work tends to fill the time you give it
- plan tomorrow before you finish today | you start the next day with a clear plan
- check how you actually spend a week | you may be surprised where the hours go

## emails | write clearer emails
? How do I write better emails at work?
? What makes a good work email?
? How can I keep my emails short and clear?
? Any tips for writing emails people actually reply to?
? How do I write an email to someone I do not know?
? How should I structure a work email?
? How can I make my emails sound more polite?
- use a subject line that says what the email is about | people can find and sort it easily
- put your main point in the first line | busy readers may not read to the end
- keep each paragraph to two or three sentences | short blocks are easier to read
- ask for one clear action | the reader knows what to do next
- read it once before you send it | you catch mistakes and unclear parts
- add a deadline if you need a reply | people reply faster when they know the timing
- use bullet points for lists of items | they are quicker to scan than long sentences
- thank the reader at the end | a kind tone makes people more willing to help

## friends | make friends in a new city
? How do I make friends after moving to a new city?
? What are good ways to meet new people as an adult?
? I just moved and do not know anyone. Where do I start?
? How can I build a social life in a new town?
? Any tips for making friends when you are shy?
? Where can adults meet new friends?
? How do I turn acquaintances into real friends?
- join a club or class that meets every week | seeing the same faces often builds friendship
- say yes to invitations even when you feel tired | many friendships start at events you almost skipped
- invite people for coffee after you meet them | someone has to take the first step
- volunteer for a local cause | working side by side makes talking easy
- ask people questions about themselves | most people enjoy talking about their lives
- follow up with a message after a good chat | it turns a single meeting into a connection
- be patient with the process | close friendships take months to form
- try a team sport or a walking group | shared activities take the pressure off talking

## stress | feel less stressed
? How can I deal with stress?
? What are quick ways to calm down when I am stressed?
? How do I stop feeling overwhelmed all the time?
? Any tips for handling stress at work?
? What helps with everyday stress?
? How can I relax after a hard day?
? How do I manage stress during a busy week?
- take a short walk outside | movement and fresh air calm the body
- breathe in slowly for four counts and out for six | a long breath out slows your heart
- write your worries down on paper | seeing them on paper makes them feel smaller
- break big tasks into small steps | one small step is easier to face than a mountain
- talk to a friend about what is going on | sharing a problem often makes it lighter
- cut back on caffeine | too much coffee can make you feel on edge
- keep a regular sleep routine | tired minds feel stress more strongly
- plan something you enjoy each day | small pleasures give you something to look forward to

## hydration | drink more water
? How can I drink more water during the day?
? I forget to drink water. Any tips?
? What are easy ways to stay hydrated?
? How do I make a habit of drinking water?
? How much water should I drink, and how do I manage it?
? What helps you drink enough water at work?
? How can I replace soda with water?
- keep a bottle on your desk | you drink more when water is always within reach
- drink a glass when you wake up | it starts the day with a simple win
- add lemon or cucumber slices | a little flavor makes water more appealing
- drink a glass with each meal | linking it to meals makes it automatic
- set a few reminders on your phone | a nudge helps until the habit sticks
- use a bottle with marks for each hour | you can see if you are on track
- eat more fruit and vegetables | many of them are mostly water
- swap one soda a day for sparkling water | you still get the fizz without the sugar

## meal prep | prepare meals for the week
? How do I start meal prepping?
? What are good tips for cooking meals for the whole week?
? How can I prepare lunches ahead of time?
? Any advice for batch cooking on Sundays?
? How do I meal prep without getting bored?
? What should I cook to eat during a busy week?
? How do I keep prepped meals fresh?
- pick two or three recipes for the week | a short list keeps shopping and cooking simple
- cook grains and proteins in big batches | they can be mixed into many different meals
- use good containers with tight lids | food stays fresh longer
- keep sauces separate until you eat | the food does not turn soggy
- freeze meals for the second half of the week | frozen food keeps safely for longer
- chop vegetables as soon as you get home from the shop | ready vegetables get used instead of wasted
- change one recipe each week | small changes stop you from getting bored
- label containers with the date | you know what to eat first

## budget travel | travel on a budget
? How can I travel cheaply?
? What are tips for a budget holiday?
? How do I save money on a trip abroad?
? Any advice for traveling on very little money?
? How can I find cheap flights and places to stay?
? What is the best way to plan an affordable vacation?
? How do I keep costs down while traveling?
- travel outside the busy season | flights and rooms cost much less
- be flexible with your travel dates | moving a trip by a day can save a lot
- stay in hostels or shared rentals | they cost a fraction of a hotel
- eat where local people eat | the food is cheaper and often better
- use public transport instead of taxis | buses and trains cost very little
- set a daily spending limit | you can see right away if you are overspending
- look for free walking tours and museums | many cities have free days or events
- pack light so you avoid baggage fees | extra bags can cost as much as the ticket

## packing | pack light for a trip
? How do I pack light for a week away?
? What should I put in my carry-on bag?
? Any tips for packing a small suitcase?
? How can I fit everything into one bag?
? What do people usually overpack when traveling?
? How do I avoid checking a bag on a flight?
? What is the smartest way to pack for a short trip?
- choose clothes that all go together | a few items make many outfits
- roll your clothes instead of folding them | rolled clothes take less space and crease less
- wear your bulkiest shoes and jacket on the plane | they take up the most room in a bag
- bring small bottles of shampoo and soap | full-size bottles waste space
- plan to do laundry once during the trip | you can pack half as many clothes
- lay everything out and then remove a third | most people pack more than they need
- keep chargers and medicine in your hand luggage | you will need them even if a bag goes missing
- use packing cubes to sort items | you find things without emptying the bag

## puppies | take good care of a new puppy
? How do I take care of a new puppy?
? What should I know before bringing a puppy home?
? Any tips for house training a puppy?
? How can I help my puppy settle in?
? What does a new puppy need in the first weeks?
? How do I stop my puppy from chewing everything?
? How do I train a young dog?
- take the puppy outside after every meal and nap | regular trips outside make house training faster
- praise and reward good behavior right away | dogs learn best from instant rewards
- give it safe chew toys | chewing is normal and needs a safe outlet
- keep training sessions short | puppies lose focus after a few minutes
- set up a quiet bed in a calm corner | a safe spot helps the puppy feel secure
- introduce new people and places slowly | gentle experiences build a calm adult dog
- book a check-up with a vet | early vaccines protect against serious illness
- stick to a regular feeding schedule | routine makes the puppy feel safe

## cats | keep an indoor cat happy
? How do I keep my indoor cat happy?
? My cat seems bored. What can I do?
? What does an indoor cat need?
? Any tips for first-time cat owners?
? How can I stop my cat from scratching the sofa?
? How do I keep my cat healthy and active?
? How do I make my home better for a cat?
- play with your cat for ten minutes twice a day | play burns energy and prevents boredom
- put a scratching post near the sofa | cats need to scratch and will pick the nearest spot
- give the cat high places to climb | cats feel safe when they can watch from above
- keep the litter box clean | cats may avoid a dirty box
- put a bird feeder outside a window | watching birds is like television for cats
- use puzzle feeders for some meals | working for food keeps the mind busy
- let the cat come to you for attention | cats trust people who respect their space
- take the cat for yearly check-ups | vets can spot problems before they get serious

## vegetables | grow vegetables at home
? How do I start a vegetable garden?
? What vegetables are easy to grow for beginners?
? Any tips for growing food on a balcony?
? How can I grow tomatoes at home?
? What should I know before planting a vegetable patch?
? How do I keep my vegetable garden healthy?
? How can I grow my own salad?
- start with easy crops like lettuce, beans and radishes | quick wins keep you motivated
- pick a spot with at least six hours of sun | most vegetables need plenty of light
- improve the soil with compost | rich soil grows stronger plants
- water deeply but not every day | deep watering encourages strong roots
- plant a few seeds every two weeks | you get a steady harvest instead of a glut
- pull weeds while they are small | young weeds come out easily
- cover the soil with mulch | it keeps moisture in and weeds down
- use large pots if you only have a balcony | many vegetables grow well in containers

## bread | bake a good loaf of bread
? How do I bake bread at home?
? Why is my homemade bread so dense?
? Any tips for baking my first loaf?
? How can I make bread with a better crust?
? What do beginners get wrong when baking bread?
? How do I know when my dough is ready?
? How can I get better at baking bread?
- weigh your flour instead of using cups | weighing is far more accurate
- let the dough rise until it has doubled | a full rise gives a light loaf
- knead until the dough is smooth and stretchy | kneading builds the structure of the bread
- use water that is warm but not hot | hot water can kill the yeast
- bake with a tray of water in the oven | the steam helps form a crisp crust
- heat the oven fully before the bread goes in | a hot oven helps the loaf rise quickly
- let the loaf cool before cutting | the inside keeps cooking as it cools
- start with a simple white loaf | simple recipes teach the basics

## phone battery | make your phone battery last longer
? How can I make my phone battery last longer?
? My phone dies by lunchtime. What can I do?
? Any tips to save battery on my phone?
? What drains a phone battery the most?
? How do I keep my phone battery healthy?
? How can I get through a full day on one charge?
? What settings help save phone battery?
- turn down the screen brightness | the screen uses more power than anything else
- close apps that track your location | location services drain the battery fast
- turn on battery saver mode | it limits background activity
- turn off notifications you do not need | each one wakes the screen and uses power
- keep the phone out of hot places | heat wears out batteries faster
- keep the charge between about twenty and eighty percent | batteries last longer without full cycles
- use wifi instead of mobile data when you can | wifi uses less power
- update your apps and system | updates often fix battery problems

## online safety | keep your online accounts safe
? How do I keep my online accounts safe?
? What makes a strong password?
? Any tips for staying safe online?
? How can I protect myself from being hacked?
? How do I spot a scam email?
? What should I do to secure my email account?
? How do I manage lots of passwords?
- use a different password for every account | one leak will not open all your accounts
- use a password manager | it remembers long passwords so you do not have to
- turn on two-step login | a stolen password alone is then not enough
- check the sender before clicking links | scam emails often copy real companies
- keep your devices updated | updates fix known security holes
- use long passphrases made of several words | long phrases are hard to guess but easy to remember
- keep codes sent to your phone to yourself | real companies will never ask for them
- back up your important files | you can recover them if something goes wrong

## slow computer | speed up a slow computer
? How can I speed up my slow computer?
? Why is my laptop so slow?
? What can I do to make my old PC faster?
? Any tips for a computer that takes ages to start?
? How do I clean up my computer?
? My laptop freezes a lot. What should I try?
? How do I make my computer run more smoothly?
- restart it at least once a week | a restart clears out stuck programs
- remove programs you no longer use | they take up space and may run in the background
- stop apps from opening at startup | fewer startup apps mean a faster boot
- keep a good amount of disk space free | a full drive slows everything down
- close browser tabs you are not using | each tab uses memory
- run a virus scan | hidden malware can slow a machine down
- install system updates | updates often improve speed and fix bugs
- think about adding more memory or a faster drive | cheap upgrades can make an old laptop feel new

## guitar | learn to play the guitar
? How do I start learning guitar?
? What should a beginner guitar player practice?
? Any tips for learning guitar on my own?
? How can I get better at guitar faster?
? How long should I practice guitar each day?
? What are the first things to learn on guitar?
? How do I stay motivated learning an instrument?
- practice for twenty minutes every day | short daily practice builds finger strength and memory
- learn a few basic chords first | many songs use the same handful of chords
- tune the guitar before every session | playing out of tune trains your ear badly
- play slowly until the changes feel clean | speed comes naturally after accuracy
- learn songs you enjoy | you will want to practice more
- use a metronome | it teaches you to keep steady time
- keep the guitar out of its case | you will pick it up more often
- take breaks when your fingertips hurt | the skin toughens up over a few weeks

## reading | read more books
? How can I read more books?
? I want to read more but never find the time. Any tips?
? How do I get back into reading?
? What are good habits for reading every day?
? How can I finish the books I start?
? Any tips for reading more when I am busy?
? How do I make reading a habit?
- carry a book with you everywhere | you can read in spare moments like waiting in line
- read for ten minutes before bed | a small daily slot adds up to many books a year
- put down books you do not enjoy | forcing yourself through them kills the habit
- try audiobooks for commutes | you can read while your hands and eyes are busy
- keep your phone in another room while reading | fewer distractions mean deeper focus
- join a book club | deadlines and friends keep you reading
- choose short books now and then | finishing a book gives a nice boost
- keep a list of books you want to read | you always know what to pick up next

## posture | sit more comfortably at your desk
? How can I improve my posture at my desk?
? My back hurts after work. How should I set up my desk?
? What is the best way to sit at a computer all day?
? Any tips for a more comfortable home office?
? How do I avoid neck pain from working on a laptop?
? How should my chair and screen be set up?
? How do I stop slouching at work?
- raise the screen to eye level | looking down for hours strains your neck
- keep your feet flat on the floor | a stable base supports your lower back
- stand up and move every half hour | long periods of sitting stiffen your muscles
- use a separate keyboard with a laptop | you can raise the screen without hunching
- keep your elbows close to your body | reaching forward strains your shoulders
- sit back in the chair with your back supported | the chair takes the load off your spine
- do a few shoulder rolls during the day | gentle movement eases tension
- put a small cushion behind your lower back | it helps keep the natural curve of your spine

## home workouts | work out at home
? How can I exercise at home without equipment?
? What is a good home workout for beginners?
? Any tips for staying fit without a gym?
? How do I stay motivated to work out at home?
? What exercises can I do in a small room?
? How can I build strength at home?
? How should I plan a weekly home workout routine?
- start with squats, push-ups and lunges | these moves work your whole body
- work out at the same time each day | a fixed time turns exercise into a habit
- begin with ten-minute sessions | short workouts are easy to start
- use a timer for simple intervals | timed sets push you without needing a coach
- make the moves harder slowly | gradual progress keeps you safe and improving
- clear a small space and keep a mat there | a ready space removes excuses
- follow a free video class | a guide helps with form and pace
- write down each workout | seeing progress keeps motivation high

## sugar | eat less sugar
? How can I cut down on sugar?
? What are easy ways to eat less sugar?
? I crave sweets all the time. What helps?
? Any tips for reducing sugar in my diet?
? How do I stop snacking on sweets at work?
? How can I cut back on sugary drinks?
? How do I make healthier snack choices?
- swap sugary drinks for water or tea | drinks are one of the biggest sources of sugar
- read food labels for hidden sugar | sauces and cereals often contain a lot
- keep fruit nearby for snacks | fruit satisfies a sweet tooth with fiber
- eat regular meals with protein | steady meals prevent sudden cravings
- keep sweets out of the house | you cannot eat what is not there
- cut down slowly over a few weeks | your taste buds adjust over time
- have a small piece of dark chocolate instead of a candy bar | a little goes a long way
- get enough sleep | tiredness makes sugar cravings stronger

## caffeine | cut back on coffee
? How do I drink less coffee?
? I drink too much coffee. How can I cut down?
? Any tips for quitting caffeine?
? How can I get through the afternoon without coffee?
? What can I drink instead of coffee?
? How do I reduce caffeine without getting headaches?
? How do I break my coffee habit?
- cut down by one cup every few days | slow changes help avoid headaches
- switch some cups to decaf | you keep the ritual with less caffeine
- drink a glass of water first when you feel tired | tiredness is often mild thirst
- take a short walk in the afternoon | fresh air and movement wake you up
- try herbal or green tea | they have little or no caffeine
- stop drinking coffee after noon | your sleep improves and you need less the next day
- eat a good breakfast | steady energy reduces the urge for coffee
- use a smaller cup | you drink less without feeling deprived

## hot weather | stay cool in hot weather
? How do I stay cool during a heatwave?
? What are tips for sleeping when it is very hot?
? How can I keep my home cool without air conditioning?
? Any advice for staying safe in hot weather?
? How do I keep cool at work in summer?
? What should I do to avoid heat exhaustion?
? How can I keep my kids cool on hot days?
- close curtains during the day | blocking the sun keeps rooms much cooler
- drink water regularly even if you do not feel thirsty | you lose a lot through sweat
- open windows at night | cool night air flushes out the heat
- wear loose, light-colored clothes | they let air move and reflect the sun
- stay indoors during the hottest hours | the midday sun is the most dangerous
- take a cool shower before bed | it lowers your body temperature for sleep
- keep a damp cloth on your neck | cooling the neck helps cool the whole body
- check on older neighbors | they are more at risk in the heat

## car care | keep your car in good shape
? How do I keep my car running well?
? What basic car maintenance should I do?
? Any tips for making my car last longer?
? What should I check on my car every month?
? How can I avoid costly car repairs?
? What car maintenance do new drivers forget?
? How do I look after an older car?
- check the tire pressure once a month | correct pressure saves fuel and wears tires evenly
- change the oil on schedule | clean oil protects the engine
- listen for new noises | strange sounds are early warnings
- keep the windshield washer fluid topped up | clear glass matters for safety
- wash off salt and dirt in winter | salt causes rust underneath
- replace wiper blades once a year | worn blades smear the glass
- drive gently when the engine is cold | oil needs a moment to reach every part
- read the owner's manual | it lists what to check and when

## cycling | start cycling to work
? How do I start cycling to work?
? What do I need to bike to the office?
? Any tips for a safe bike commute?
? How can I commute by bike without arriving sweaty?
? What should I know before cycling in the city?
? How do I plan a bike route to work?
? Is cycling to work hard, and how do I begin?
- try the route on a weekend first | you learn it without time pressure
- pick quiet streets over the fastest roads | less traffic makes the ride calmer and safer
- wear bright clothes and use lights | drivers need to see you
- ride at an easy pace | you arrive without being soaked in sweat
- keep a change of clothes at work | you can freshen up after the ride
- get a good lock | bike theft is common in cities
- check your tires and brakes each week | small problems are easy to fix early
- start with one or two days a week | your legs get used to it gradually

## parties | plan a birthday party
? How do I plan a birthday party?
? Any tips for throwing a surprise party?
? What do I need to organize a birthday party for a child?
? How can I plan a party on a small budget?
? What should I do to host a birthday at home?
? How far ahead should I plan a party?
? How do I make a birthday party go smoothly?
- set a budget before anything else | it shapes every other choice
- send invitations about three weeks ahead | people need time to plan
- choose a simple theme | a theme makes decorations and food easier to pick
- plan a few games or activities | guests relax when there is something to do
- make a timeline for the day | you know what needs doing and when
- ask a friend to help on the day | an extra pair of hands lowers stress
- prepare food that can be made ahead | you can enjoy the party instead of cooking
- check for allergies among the guests | everyone can eat safely

## gifts | pick a thoughtful gift
? How do I choose a good gift?
? What should I get someone who has everything?
? Any tips for picking a gift for a friend?
? How can I find a thoughtful present on a budget?
? What makes a gift feel personal?
? How do I choose a present for my partner?
? What is a good gift for a coworker?
- think about what they talk about often | their interests point to good ideas
- give an experience like a class or a show | memories often mean more than objects
- keep a note of ideas during the year | you will not be stuck at the last minute
- add a handwritten card | a few kind words make any gift personal
- look for something they would not buy for themselves | small treats feel special
- ask a close friend of theirs for ideas | friends often know what someone wants
- choose quality over size | one good item beats several cheap ones
- keep the receipt | they can swap it if it does not fit

## dinner parties | host a relaxed dinner for friends
? How do I host a dinner party?
? Any tips for cooking for a group of friends?
? What should I make for guests at home?
? How can I host dinner without getting stressed?
? What makes a dinner party go well?
? How do I plan a dinner for eight people?
? How can I be a better host?
- cook dishes you have made before | a dinner party is not the time for experiments
- make as much as you can the day before | you get to spend time with your guests
- ask about food allergies when you invite people | nobody ends up with nothing to eat
- set the table early | small jobs are done before anyone arrives
- keep the menu to three simple courses | fewer dishes mean less stress
- have drinks and snacks ready when guests arrive | it gives everyone something to do
- let guests help if they offer | people like to feel involved
- put on quiet music | it fills silences and sets the mood

## toddler bedtime | get a toddler to bed on time
? How do I get my toddler to go to bed?
? My toddler fights bedtime every night. What can I do?
? What is a good bedtime routine for a toddler?
? Any tips for getting small children to sleep?
? How can I make bedtime easier with kids?
? How do I stop my toddler getting out of bed?
? How do I help my child fall asleep on their own?
- follow the same routine every night | children feel safe when they know what comes next
- start winding down half an hour before bed | a calm half hour helps the body prepare for sleep
- turn off screens after dinner | screen light makes it harder to fall asleep
- read a short story together | it gives a calm and cozy end to the day
- keep the room dark with a small night light | dim light helps sleep without fear of the dark
- offer small choices like which pajamas to wear | a sense of control reduces protests
- return them to bed calmly and quietly | a boring response removes the game
- keep bedtime at the same time on weekends | a steady clock makes each night easier

## homework | help a child with homework
? How can I help my child with homework?
? My kid hates doing homework. Any tips?
? What is the best way to support a child's schoolwork?
? How do I set up a homework routine?
? How can I help without doing the homework for them?
? How do I keep my child focused on homework?
? What should parents do when homework gets hard?
- set a fixed homework time each day | a routine reduces daily arguments
- give them a quiet spot with good light | a calm space helps focus
- ask questions instead of giving answers | children learn more when they work it out
- break work into small chunks with breaks | short bursts keep attention high
- praise effort rather than results | it builds a habit of trying hard
- keep phones and the TV off | fewer distractions make the work faster
- talk to the teacher if they are often stuck | teachers can adjust the load or explain
- have a healthy snack before starting | hunger makes it hard to think

## remote work | work well from home
? How do I stay productive working from home?
? Any tips for remote work?
? How can I separate work and home life when working remotely?
? What makes a good home office?
? How do I avoid feeling lonely working from home?
? How do I keep a routine when I work remotely?
? What helps with focus when working from home?
- keep regular working hours | clear hours stop work from spilling into evenings
- set up a space used only for work | your brain links that place with focus
- get dressed as if going to the office | it signals the start of the work day
- take a real lunch break away from the screen | a real break restores energy
- call colleagues instead of only messaging | voice contact keeps you connected
- shut down the laptop at the end of the day | a clear finish helps you switch off
- go for a short walk before starting | it replaces the commute as a mental break
- plan your three main tasks each morning | clear goals keep you on track

## decluttering | clear out clutter
? How do I declutter my home?
? Where should I start when my house is full of clutter?
? Any tips for getting rid of things I do not need?
? How can I keep my home from getting cluttered again?
? How do I decide what to throw away?
? What is a good way to clear out a messy closet?
? How do I declutter when I am attached to my things?
- start with one drawer or shelf | a small win builds momentum
- sort items into keep, donate and bin piles | clear piles make decisions faster
- ask yourself if you used it in the past year | unused items rarely get used later
- take donations out of the house the same day | the bags do not sneak back in
- keep one item and let go of duplicates | most homes have several of the same thing
- take photos of things you keep for memories | the memory stays while the object goes
- bring one thing in and take one thing out | clutter stops building up again
- set a timer for twenty minutes | short sessions stop you feeling overwhelmed

## laundry | do laundry without ruining your clothes
? How do I do laundry the right way?
? Why do my clothes shrink in the wash?
? Any tips for keeping clothes looking new?
? How should I sort laundry?
? How do I stop colors from running in the wash?
? What are laundry basics everyone should know?
? How can I make my clothes last longer?
- read the care labels before washing | each fabric needs different treatment
- wash darks and lights separately | dark dyes can stain pale clothes
- use cold water for most loads | it protects colors and saves energy
- turn jeans and printed shirts inside out | it protects the outside from rubbing
- leave room in the machine | clothes need space to move to get clean
- air dry delicate items | dryer heat shrinks and weakens fibers
- treat stains as soon as possible | fresh stains come out much more easily
- use less detergent than you think | too much soap leaves a residue

## photography | take better photos with your phone
? How can I take better photos with my phone?
? Any tips for phone photography?
? How do I make my pictures look more polished?
? Why do my phone photos look blurry?
? How can I take better pictures of my friends?
? What are simple tricks for nicer travel photos?
? How do I get good photos in low light on a phone?
- wipe the lens before shooting | a smudged lens makes photos hazy
- use natural light whenever you can | soft daylight flatters almost everything
- tap the screen to focus on your subject | the phone then knows what matters
- follow the rule of thirds | off-center subjects look more interesting
- hold the phone steady with both hands | less shake means sharper photos
- get closer instead of using zoom | digital zoom lowers the quality
- shoot during the hour before sunset | warm low light gives a lovely glow
- take several shots of the same scene | you can keep the best one

## camping | enjoy your first camping trip
? What do I need for my first camping trip?
? Any tips for camping as a beginner?
? How do I stay warm when camping?
? What should I know before going camping?
? How can I make camping more comfortable?
? How do I plan a simple camping weekend?
? What do first-time campers forget?
- practice setting up the tent at home | you will not struggle with it in the dark
- bring a sleeping mat as well as a bag | the cold ground steals heat from below
- pack a headlamp with spare batteries | nights at camp are very dark
- pick a campsite with toilets for your first trip | basic facilities make it far easier
- plan simple meals you can cook in one pot | fewer dishes mean less cleanup
- bring layers for the evening | temperatures drop quickly after sunset
- check the weather before you leave | you can pack the right gear
- arrive with plenty of daylight left | setting up is easier when you can see

## swimming | learn to swim as an adult
? How can I learn to swim as an adult?
? I am scared of deep water. How do I start swimming?
? Any tips for a beginner swimmer?
? How do I get better at breathing while swimming?
? What should I practice first when learning to swim?
? How can I swim longer without getting tired?
? How do I build confidence in the pool?
- take lessons with a qualified teacher | good habits are easier to learn than to unlearn
- start in the shallow end | standing up is always an option
- practice floating on your back | floating shows that the water holds you up
- learn to breathe out under water | breathing out slowly stops panic
- use a kickboard to practice kicking | you can focus on your legs alone
- go to the pool two or three times a week | regular practice builds confidence
- swim at quiet times | fewer people make it calmer
- wear goggles | seeing clearly makes you feel much more at ease

## note taking | take better notes
? How do I take better notes in class?
? What is a good way to take notes in meetings?
? Any tips for note taking while reading?
? How can I make my notes easier to review?
? Should I take notes by hand or on a laptop?
? How do I remember what I write down?
? How can I organize my notes?
- write in your own words | rephrasing forces you to understand
- note key ideas rather than every word | short notes are easier to review
- leave space to add thoughts later | you can fill gaps when you review
- review your notes within a day | a quick review fixes the ideas in memory
- use headings and simple symbols | structure makes notes quick to scan
- write down questions as they come up | you remember to ask or look them up
- keep all notes for one subject in one place | you will not lose track of them
- finish each page with a short summary | summing up tests what you understood

## habits | build a habit that lasts
? How do I build a new habit?
? Why do I always give up on new habits?
? Any tips for sticking to a routine?
? How long does it take to form a habit?
? How can I make good habits easier?
? How do I stay consistent with my goals?
? What is the best way to start a healthy habit?
- start with a tiny version of the habit | small steps are easy to repeat every day
- attach it to something you already do | an old habit acts as a reminder
- track it on a calendar | a chain of ticks motivates you to keep going
- make the habit easy to start | less friction means fewer excuses
- plan for bad days | a backup plan stops one slip from ending the streak
- reward yourself after each week | a small treat makes the habit feel good
- tell a friend about your goal | someone checking in keeps you honest
- focus on showing up rather than results | consistency matters more than intensity

## procrastination | stop putting things off
? How do I stop procrastinating?
? I keep putting off important tasks. What helps?
? Any tips for getting started on work I am avoiding?
? How can I beat procrastination when studying?
? Why do I procrastinate, and how can I stop?
? How do I get motivated to do boring tasks?
? What are tricks to get things done on time?
- commit to five minutes of work | starting is the hardest part
- break the task into tiny steps | a clear first step feels less scary
- remove distractions before you begin | temptation is easier to avoid than resist
- set a deadline earlier than the real one | a buffer reduces last-minute panic
- work with a friend or in a library | other people working nearby keep you on task
- reward yourself when you finish a step | rewards make hard tasks more appealing
- forgive yourself for past delays | guilt often leads to more avoidance
- do the task at your best time of day | energy makes starting easier

## neighbors | deal with a noisy neighbor
? How do I deal with a noisy neighbor?
? My neighbors play loud music late. What should I do?
? Any tips for talking to a neighbor about noise?
? How can I block out noise from next door?
? What is the polite way to complain about noise?
? How do I handle a neighbor who ignores my requests?
? How can I sleep with noisy neighbors?
- talk to them calmly in person first | most people do not realize they are loud
- pick a good moment to talk | a relaxed chat works better than a late-night knock
- suggest a simple solution like quiet hours | a clear request is easy to agree to
- use earplugs or a white noise machine | they mask sound while you sleep
- keep a note of dates and times | a record helps if you need to take it further
- check the rules in your lease | many buildings have set quiet hours
- contact the landlord if talking does not work | they can step in with authority
- put rugs and bookshelves against shared walls | soft surfaces soak up sound

## used cars | buy a good used car
? How do I buy a used car?
? What should I check before buying a second-hand car?
? Any tips for not overpaying for a used car?
? How do I choose a reliable used car?
? What questions should I ask a car seller?
? How can I get a good deal on a used car?
? What do people miss when buying a used car?
- set a budget that includes insurance and repairs | the price tag is only part of the cost
- check the service history | regular servicing shows the car was cared for
- take it for a long test drive | problems show up after the engine warms up
- have a mechanic inspect it | an expert can spot hidden damage
- look up the usual price for that model | you know when a deal is fair
- check for rust under the car | rust is costly to repair
- view the car in daylight | dents and scratches hide in the dark
- walk away if the seller rushes you | pressure is often a warning sign

## colds | feel better when you have a cold
? What helps when I have a cold?
? How can I recover from a cold faster?
? Any tips for getting through a cold at work?
? What should I do when I feel a cold coming on?
? How do I ease a sore throat and stuffy nose?
? How can I sleep better with a cold?
? What are simple home remedies for a cold?
- rest as much as you can | your body fights the virus better when you rest
- drink plenty of warm fluids | they soothe your throat and keep you hydrated
- gargle with warm salt water | it can ease a sore throat
- use an extra pillow at night | raising your head helps you breathe
- wash your hands often | it stops the cold spreading to others
- eat simple, nourishing food like soup | it is easy to digest and comforting
- take a steamy shower | moist air loosens a blocked nose
- see a doctor if you feel worse after a week | it may be something more than a cold

## coffee | make better coffee at home
? How do I make better coffee at home?
? Why does my home coffee taste bitter?
? Any tips for brewing coffee like a cafe?
? What is the best way to start making coffee at home?
? How can I make a good cup with a simple setup?
? What do I need to brew great coffee?
? How do I make my morning coffee taste better?
- buy freshly roasted whole beans | coffee loses flavor within weeks of roasting
- grind the beans right before brewing | ground coffee goes stale fast
- use water that has cooled a little after boiling | boiling water can make coffee bitter
- weigh your coffee and water | a steady ratio gives a steady taste
- clean your equipment regularly | old oils make coffee taste stale
- store beans in a sealed jar away from light | air and light spoil the flavor
- use filtered water if your tap water is hard | water makes up most of the cup
- change one thing at a time | you learn what each change does
"""


@dataclass(frozen=True)
class Tip:
    """One concrete piece of advice: an imperative verb phrase and a reason clause."""

    text: str  # "keep the same bedtime every day"
    reason: str  # "your body learns when to wind down"


@dataclass(frozen=True)
class Topic:
    name: str
    goal: str  # a verb phrase that completes "to ..." / "help you ...": "sleep better"
    tips: tuple[Tip, ...]


@dataclass(frozen=True)
class Request:
    id: str  # "<topic>-<k>", e.g. "sleep-0"
    text: str  # the prompt
    topic: Topic


def _parse_topics(text: str) -> tuple[list[Topic], list[Request]]:
    topics: list[Topic] = []
    requests: list[Request] = []
    blocks = [b for b in text.strip().split("## ") if b.strip()]
    for block in blocks:
        lines = [ln.strip() for ln in block.strip().splitlines() if ln.strip()]
        name, goal = (s.strip() for s in lines[0].split("|"))
        tips, prompts = [], []
        for ln in lines[1:]:
            if ln.startswith("? "):
                prompts.append(ln[2:].strip())
            elif ln.startswith("- "):
                tip, reason = (s.strip() for s in ln[2:].split("|"))
                tips.append(Tip(tip, reason))
            else:
                raise ValueError(f"bad topic line in {name!r}: {ln!r}")
        topic = Topic(name=name, goal=goal, tips=tuple(tips))
        topics.append(topic)
        slug = name.replace(" ", "-")
        requests.extend(Request(id=f"{slug}-{k}", text=p, topic=topic) for k, p in enumerate(prompts))
    return topics, requests


TOPICS, REQUESTS = _parse_topics(_TOPICS_TEXT)  # 55 topics, 385 requests
REQUEST_BY_TEXT: dict[str, Request] = {r.text: r for r in REQUESTS}
REQUEST_BY_ID: dict[str, Request] = {r.id: r for r in REQUESTS}


# ---------------------------------------------------------------------------------------------
# Phrase banks, one list per register. Frames hold {x} (the tip, lowercase start) or {X}
# (capitalised); intros hold {goal}; reason frames hold {r}. Formal entries use no
# contractions and no "!"; casual entries carry at least one casual cue; neutral entries carry
# none (tests check all three against the tone scorer).
# ---------------------------------------------------------------------------------------------

FORMAL, NEUTRAL, CASUAL = "formal", "neutral", "casual"
REGISTERS = (FORMAL, NEUTRAL, CASUAL)

OPENERS: dict[str, list[str]] = {
    FORMAL: [
        "Certainly.", "Certainly, I can help with that.", "Of course; I would be glad to assist.",
        "Thank you for your question.", "Thank you for asking; I shall be brief.", "I would be pleased to assist.",
        "Allow me to offer some guidance.", "Allow me to outline a few recommendations.",
        "Indeed, this is a common concern.", "This is a common concern, and it can certainly be addressed.",
        "I would be glad to offer some guidance.", "Certainly; the matter is fairly simple.",
        "With pleasure.", "That is an excellent question, and I am happy to assist.",
        "Thank you for reaching out.", "It would be my pleasure to assist.",
        "Certainly, the following guidance should be of assistance.", "An important question, indeed.",
        "I appreciate the question.", "Naturally, I am glad to assist.",
        "Thank you; I shall address this directly.", "Certainly, this can be managed with a few measures.",
        "I am pleased to offer a few recommendations.", "Indeed, there are several sensible measures.",
        "A sensible question, certainly.", "Allow me to be concise.", "I shall summarise the essentials.",
        "Thank you for the question; I am happy to advise.", "Certainly; please consider the following.",
        "It is a pleasure to assist with this.", "I would be delighted to assist.", "Certainly, allow me to explain.",
        "This is a reasonable request, and I shall address it.", "I am glad you asked; allow me to assist.",
        "Permit me to offer a few suggestions.", "Very well; I shall outline the key points.",
        "Indeed, a few measures should suffice.", "Thank you; this is a sensible concern.",
        "Certainly, I shall be glad to advise.", "Thank you for the enquiry.",
    ],
    NEUTRAL: [
        "Good question.", "Sure.", "Happy to help.", "A few things help here.", "Here are some ideas.",
        "There are a few simple steps.", "Good news: this is easy to improve.", "Let me help with that.",
        "Here are a few pointers.", "A few small changes can help.", "Sure, here are some ideas.",
        "Many people ask this.", "Here are the basics.", "This comes down to a few habits.",
        "The good news is that small steps work.", "Yes, this can be done.", "Great goal.",
        "That makes sense to ask.", "This is what helps.", "A few habits make a big difference.",
        "Here are some thoughts.", "Sure, happy to help.", "Good thing to work on.", "Right, a few points.",
        "Here are some suggestions.", "There are a few options.",
    ],
    CASUAL: [
        "Hey!", "Hey there!", "Oh, good question!", "Ooh, great question!", "Sure thing!", "Oh, totally!",
        "Happy to help!", "Okay, so here's the deal.", "Yes! Love this question.", "Oh, I've got you!",
        "Hi! Great question.", "Ah, this one's easy!", "Oh, I get this a lot!", "Honestly, great question!",
        "Alright, let's do this!", "Oh nice, I love this one!", "Totally doable!", "Haha, been there!",
        "Yay, a fun one!", "Hey, no worries!", "Oh man, I hear you!", "You're gonna love this!",
        "Good news: it's easier than you think!", "Okay, quick one!", "Hey hey!", "Oh, easy!",
        "Ooh, I've got some ideas!", "Ha, I know the feeling!", "Oh, for sure!", "Hey, you're in luck!",
        "Yes, absolutely!", "Hiya! Let's sort this out.", "Oh, love this!", "Okay okay, I've got ideas!",
        "Yesss, great one!", "Heyy! So glad you asked.", "Ooh, fun!", "Aww, I feel you!", "Haha, okay, here goes!",
        "Oh wow, good one!", "Hey friend!", "Gotcha!",
    ],
}

INTROS: dict[str, list[str]] = {
    FORMAL: [
        "There are several measures that can help you {goal}.",
        "The following recommendations should help you {goal}.",
        "If you wish to {goal}, a few habits are worth adopting.",
        "Several approaches are worth considering if you wish to {goal}.",
        "It is entirely possible to {goal} with a few deliberate changes.",
        "To {goal}, it is advisable to focus on a small number of habits.",
        "It is possible for anyone to {goal} by attending to a few key areas.",
        "Those who wish to {goal} will benefit from the following measures.",
        "A structured approach is the most reliable way to {goal}.",
        "It is worth noting that most people can {goal} with modest effort.",
    ],
    NEUTRAL: [
        "Here are a few ways to {goal}.", "A few habits can help you {goal}.",
        "There are some simple steps that help you {goal}.", "Most people can {goal} with a few changes.",
        "If you want to {goal}, start with the basics.", "These ideas can help you {goal}.",
        "You can {goal} with a few small changes.",
        "A little planning goes a long way when you want to {goal}.",
        "Some simple habits make it easier to {goal}.", "To {goal}, focus on a few key habits.",
    ],
    CASUAL: [
        "There's a bunch of easy stuff you can do to {goal}!", "Okay, so here's what helps you {goal}.",
        "You can totally {goal} with a few small tweaks!", "Honestly, it's not that hard to {goal}.",
        "If you wanna {goal}, here's my go-to list!", "Good news, it's super doable to {goal}!",
        "So you wanna {goal}? Love it!", "Here's what worked for me when I wanted to {goal}.",
        "Let's get you ready to {goal}!", "It's way easier to {goal} than folks think!",
    ],
}

# Tip frames. A frame marked with a leading "^" is a label ("Pro tip: ...") and takes no connective.
TIP_FRAMES: dict[str, list[str]] = {
    FORMAL: [
        "It is advisable to {x}.", "I would recommend that you {x}.", "It is recommended to {x}.",
        "You would be well advised to {x}.", "It would be prudent to {x}.", "It is worthwhile to {x}.",
        "It is sensible to {x}.", "You may wish to {x}.", "It is important to {x}.",
        "It would be beneficial to {x}.", "I would advise you to {x}.", "It is essential to {x}.",
        "It would be wise to {x}.", "A prudent step is to {x}.", "It is generally advisable to {x}.",
        "I would suggest that you {x}.", "You are advised to {x}.", "It is highly advisable to {x}.",
        "One sensible measure is to {x}.", "Please {x}.",
    ],
    NEUTRAL: [
        "{X}.", "Try to {x}.", "Make sure to {x}.", "It helps to {x}.", "A good idea is to {x}.",
        "Remember to {x}.", "Aim to {x}.", "You can also {x}.", "A simple step is to {x}.",
        "One useful habit is to {x}.", "Be sure to {x}.", "Another good step is to {x}.",
        "^Try this: {x}.", "What works well is to {x}.", "It pays to {x}.", "Plan to {x}.",
    ],
    CASUAL: [
        "Just {x}!", "Honestly, just {x}.", "I'd totally {x}.", "You'll wanna {x}.", "Definitely {x}!",
        "^My go-to? {X}!", "Seriously, {x}.", "It's super helpful to {x}!", "Don't forget to {x}!",
        "You can totally {x}.", "^Pro tip: {x}!", "Trust me, {x}!", "^Big one: {x}!",
        "^I swear by this one: {x}.", "^Super simple: {x}!", "^Here's a trick: {x}!",
        "Totally worth it to {x}!", "^I always tell friends this: {x}!", "Gotta say, it helps a ton to {x}!",
        "You're gonna want to {x}.",
    ],
}

CONNECTIVES: dict[str, list[str]] = {
    FORMAL: ["Furthermore,", "In addition,", "Moreover,", "Additionally,", "Likewise,", "Equally,",
             "Beyond this,", "As a further measure,", "In a similar vein,", "Furthermore, and equally important,"],
    NEUTRAL: ["Also,", "Next,", "Besides that,", "After that,", "On top of that,", "Then,", "Beyond that,",
              "At the same time,", "Another thing:", "Along with that,"],
    CASUAL: ["Oh, and", "Oh, plus,", "And hey,", "Oh, also,", "And honestly,", "Ooh, bonus:", "Oh! And", "And yeah,",
             "Okay, and", "Ooh, and"],
}

# How a reason attaches to its tip: inline (", as {r}") or as its own sentence.
REASON_INLINE: dict[str, list[str]] = {
    FORMAL: [", as {r}", ", since {r}", ", given that {r}", ", for {r}"],
    NEUTRAL: [", because {r}", ", since {r}", " because {r}", ", as {r}"],
    CASUAL: [", because {r}", " 'cause {r}", ", since {r}", ", 'cause {r}"],
}
REASON_SENTENCES: dict[str, list[str]] = {
    FORMAL: ["This is advisable because {r}.", "The reason is that {r}.", "This is beneficial, as {r}.",
             "This matters considerably, since {r}.", "The rationale is that {r}.", "Indeed, {r}."],
    NEUTRAL: ["This helps because {r}.", "That matters since {r}.", "The reason is simple: {r}.",
              "It works because {r}.", "The idea is that {r}.", "The upside is that {r}."],
    CASUAL: ["Trust me, {r}!", "Why? Because {r}!", "The thing is, {r}.", "Honestly, {r}.",
             "It works 'cause {r}.", "Seriously, {r}!"],
}

SUMMARIES: dict[str, list[str]] = {
    FORMAL: ["In summary, consistency is more important than any single measure.",
             "In short, modest and regular effort is the most reliable approach.",
             "Above all, it is advisable to begin with one change and proceed gradually.",
             "To conclude, patience is essential.", "In summary, small and deliberate steps are most effective.",
             "Consequently, it is wise to introduce these changes one at a time."],
    NEUTRAL: ["The key is to start small and stay consistent.", "One change at a time is plenty.",
              "Pick the ideas that fit your life best.", "Small changes add up over time.",
              "Steady effort beats big bursts.", "Most of this gets easier after a few weeks."],
    CASUAL: ["Basically, keep it simple and stick with it!", "Honestly, the trick is to start!",
             "Don't stress about doing it all at once!", "The big thing? Keep at it, even on lazy days!",
             "Seriously, little stuff adds up!", "And hey, nobody's perfect, so go easy on yourself!"],
}

CLOSERS: dict[str, list[str]] = {
    FORMAL: [
        "I trust this is of assistance.", "I hope this guidance proves useful.",
        "Should you require further assistance, please let me know.",
        "Please do not hesitate to ask if you require further detail.", "I wish you every success.",
        "Kind regards.", "I trust these recommendations will prove beneficial.",
        "Should you have further questions, I would be pleased to assist.",
        "Consistency is, therefore, the decisive factor.", "I hope this information is of use to you.",
        "Please let me know should you wish to discuss this further.",
        "With best wishes for your progress.", "It is my hope that this proves helpful.",
        "These measures should yield a noticeable improvement.",
        "I remain at your disposal for any further questions.", "Best of luck with this endeavour.",
        "I trust you will find these suggestions helpful.", "Kindly let me know how you progress.",
        "I hope this clarifies the matter.", "I would be pleased to elaborate on any of these points.",
    ],
    NEUTRAL: [
        "Good luck.", "That should help.", "Start with one change and build from there.",
        "Give it a week or two and see what works.", "These steps should make a difference.",
        "Pick one idea and try it this week.", "Consistency matters more than perfection.",
        "Try a few of these and keep what works.", "It gets easier with practice.",
        "Most people see a difference within a few weeks.", "Take it one step at a time.",
        "Keep it simple at first.", "Those are the basics.", "Any one of these is a good place to start.",
        "Progress comes with time.", "See what fits your routine.", "Start small and stay steady.",
        "That covers the main points.", "Adjust as you go.", "Good luck with it.",
    ],
    CASUAL: [
        "Hope that helps!", "You've got this!", "Good luck, you'll do great!", "Have fun with it!",
        "Let me know how it goes!", "Cheers!", "Fingers crossed for you!", "Go get 'em!",
        "You'll be fine, promise!", "Hope this helps a bit! \U0001F60A", "Enjoy! \U0001F642", "Good luck! \U0001F44D",
        "Easy peasy!", "Trust me, it works!", "Keep me posted!", "Rooting for you!",
        "Honestly, you'll be amazed!", "Hope that's useful!", "Have a great one!", "You're gonna nail it!",
        "Don't overthink it, you're doing great!", "Small steps, big wins!", "That's it, super simple!",
        "Give it a go and see!", "Happy to help anytime!", "Catch ya later!", "Best of luck, friend!",
        "No stress, you've totally got this!", "It's a game changer, honestly!", "Good vibes your way! \u2728",
    ],
}

# Uncontracted form -> contraction (lowercase keys). The pronoun + verb forms only contract
# before another word ("as it is." stays).
_CONTRACTIONS: dict[str, str] = {
    "it is": "it's", "that is": "that's", "there is": "there's", "here is": "here's", "what is": "what's",
    "you are": "you're", "you will": "you'll", "you would": "you'd", "i would": "i'd", "i am": "i'm",
    "i will": "i'll", "they are": "they're", "we are": "we're", "it will": "it'll", "they will": "they'll",
    "we will": "we'll", "that will": "that'll", "let us": "let's",
    "do not": "don't", "does not": "doesn't", "did not": "didn't", "is not": "isn't", "are not": "aren't",
    "cannot": "can't", "will not": "won't", "would not": "wouldn't", "should not": "shouldn't",
    "has not": "hasn't", "have not": "haven't", "was not": "wasn't", "could not": "couldn't",
}
_NEG_FORMS = {k for k in _CONTRACTIONS if k.endswith("not")}
_CONTRACT_RE = re.compile(
    r"\b(" + "|".join(sorted((k for k in _CONTRACTIONS if k not in _NEG_FORMS), key=len, reverse=True))
    + r")\b(?=\s+[A-Za-z])|\b(" + "|".join(sorted(_NEG_FORMS, key=len, reverse=True)) + r")\b",
    re.IGNORECASE,
)


# ---------------------------------------------------------------------------------------------
# Gold scorers
# ---------------------------------------------------------------------------------------------

VERBOSITY_CENTER_WORDS = 37.0  # 0 on the verbosity scale
VERBOSITY_SLOPE = 1.4  # per unit of ln(words)
TONE_GAIN = 12.5  # per unit of (casual - formal) cue weight per word
TONE_SMOOTHING_WORDS = 10.0  # keeps one cue in a three-word reply from saturating

_WORD_RE = re.compile(r"'?[a-z0-9]+(?:'[a-z]+)*")
_PRONOUN_S = {"it", "that", "there", "here", "what", "who", "where", "how", "he", "she", "let", "everything",
              "nothing", "something", "everyone", "somebody", "nobody", "this", "why", "when"}
_CONTRACTION_SUFFIXES = ("n't", "'ll", "'re", "'ve", "'d", "'m")
_CASUAL_TOKENS = {"'cause", "'em", "'til", "y'all", "ya'll", "c'mon", "gonna", "wanna", "gotta", "kinda", "sorta",
                  "dunno", "lemme", "gimme", "outta", "ain't"}

CASUAL_WORDS: dict[str, float] = {
    "hey": 1.0, "hiya": 1.0, "yo": 1.0, "hi": 0.5, "honestly": 1.0, "totally": 1.0, "super": 1.0, "awesome": 1.0,
    "gonna": 1.0, "wanna": 1.0, "gotta": 1.0, "kinda": 1.0, "sorta": 1.0, "yeah": 1.0, "yep": 1.0, "yup": 1.0,
    "nope": 1.0, "nah": 1.0, "lol": 1.5, "haha": 1.5, "hehe": 1.5, "btw": 1.0, "tbh": 1.0, "omg": 1.5,
    "imo": 1.0, "ok": 0.5, "okay": 0.5, "oh": 0.7, "ooh": 1.0, "wow": 1.0, "yay": 1.0, "whoa": 1.0, "ugh": 1.0,
    "stuff": 0.7, "basically": 0.5, "literally": 0.5, "definitely": 0.4, "amazing": 0.7,
    "ya": 1.0, "folks": 0.5, "dude": 1.0, "guys": 0.7, "buddy": 1.0, "cheers": 1.0, "alright": 0.7,
    "anyways": 1.0, "gosh": 1.0, "comfy": 1.0, "tons": 0.7, "bunch": 0.5, "ha": 1.0, "hooray": 1.0,
    "fab": 1.0, "gotcha": 1.0, "yesss": 1.0, "heyy": 1.0, "aww": 1.0, "vibes": 1.0, "peasy": 1.0,
    "doable": 0.5, "tweaks": 0.5,
}
CASUAL_PHRASES: dict[str, float] = {
    "game changer": 1.0, "pro tip": 1.0, "trust me": 1.0, "you got this": 1.0, "hope that helps": 1.0,
    "hope this helps": 1.0, "no worries": 1.0, "go-to": 1.0, "a ton": 1.0, "swear by": 1.0,
    "fingers crossed": 1.0, "rooting for you": 1.0, "keep me posted": 1.0, "give it a go": 0.7,
    "nail it": 1.0, "been there": 1.0, "i hear you": 0.7, "oh man": 1.0, "for sure": 0.7, "love this": 1.0,
    "love it": 1.0, "have fun": 0.7, "sure thing": 1.0, "no biggie": 1.0, "no stress": 1.0, "way easier": 0.7,
    "got you": 0.7, "big wins": 0.5, "have a great one": 1.0, "seriously,": 0.7, "seriously!": 0.7,
    "the thing is": 0.7, "i feel you": 1.0,
}
FORMAL_WORDS: dict[str, float] = {
    "certainly": 1.0, "furthermore": 1.2, "moreover": 1.2, "additionally": 0.8, "consequently": 1.0,
    "therefore": 0.7, "thus": 0.8, "hence": 1.0, "whereby": 1.0, "accordingly": 1.0, "subsequently": 1.0,
    "nevertheless": 0.8, "nonetheless": 0.8, "indeed": 0.8, "advisable": 1.0, "advised": 0.8, "advise": 0.7,
    "recommend": 0.6, "recommended": 0.6, "recommendation": 0.6, "recommendations": 0.6, "assist": 1.0,
    "assistance": 1.0, "guidance": 0.8, "kindly": 1.0, "please": 0.4, "shall": 1.0, "regarding": 0.8,
    "pertaining": 1.0, "prudent": 1.0, "beneficial": 0.8, "essential": 0.4, "utilize": 1.0, "utilise": 1.0,
    "approximately": 0.8, "numerous": 0.7, "sufficient": 0.7, "adequate": 0.7, "appropriate": 0.6,
    "obtain": 0.7, "commence": 1.0, "facilitate": 1.0, "endeavour": 1.0, "endeavor": 1.0, "pleased": 0.8,
    "pleasure": 0.5, "appreciate": 0.5, "individuals": 0.8, "whom": 0.8, "measures": 0.5, "measure": 0.3,
    "yield": 0.5, "considerable": 0.7, "considerably": 0.7, "worthwhile": 0.6, "sensible": 0.6, "regards": 1.0,
    "sincerely": 1.0, "deliberate": 0.6, "ensure": 0.5, "concern": 0.4, "optimal": 0.6, "thereby": 1.0,
    "therein": 1.0, "herein": 1.0, "aforementioned": 1.5, "undoubtedly": 0.8, "notably": 0.6,
    "rationale": 0.8, "summarise": 0.6, "summarize": 0.6, "elaborate": 0.6, "clarifies": 0.5, "equally": 0.5,
    "excellent": 0.3, "modest": 0.4, "decisive": 0.6, "noticeable": 0.4, "likewise": 0.6,
    "entirely": 0.3, "structured": 0.3, "attending": 0.3, "refrain": 1.0, "adhere": 1.0, "adherence": 1.0,
    "whilst": 1.0, "henceforth": 1.0, "enquiry": 0.7, "inquiry": 0.5, "permit": 0.8, "suffice": 0.8,
    "furnish": 1.0, "inquire": 0.7, "enquire": 0.7, "commencing": 1.0,
}
FORMAL_PHRASES: dict[str, float] = {
    "in addition": 1.0, "in summary": 1.0, "in conclusion": 1.0, "to conclude": 1.0, "allow me": 1.0,
    "it is advisable": 0.5, "one should": 1.5, "one can": 1.0, "one may": 1.5, "one might": 1.0,
    "one sensible": 0.5, "should you": 1.0, "do not hesitate": 1.0, "at your disposal": 1.5, "i trust": 1.0,
    "it is worth noting": 1.0, "prior to": 1.0, "with regard to": 1.0, "in order to": 0.5, "well advised": 0.5,
    "the following": 0.4, "the matter": 0.7, "i wish you": 0.5, "if you wish": 0.7, "you may wish": 0.7,
    "best wishes": 0.5, "kind regards": 0.5, "in a similar vein": 1.0, "beyond this": 0.7, "of use": 0.5,
    "it is my hope": 1.0, "would be wise": 0.5, "thank you for": 0.5, "given that": 0.5,
}
_UNCONTRACTED_WEIGHT = 0.8
_CONTRACTION_WEIGHT = 1.0
_EXCLAIM_WEIGHT = 1.0
_EMOJI_WEIGHT = 1.5

_EMOJI_RE = re.compile("[\U0001F300-\U0001FAFF\U00002600-\U000027BF\U0001F000-\U0001F2FF\u2B50\u2B55\u203C\u2049]")
_EMOTICON_RE = re.compile(r"(?:^|\s)(?:[:;=]-?[)(DPp]|<3|\^_\^|xD)(?=\s|$|[.,!?])")
_EXCLAIM_RE = re.compile(r"!+")
_UNCONTRACTED_RE = re.compile(r"\b(?:" + "|".join(sorted(_CONTRACTIONS, key=len, reverse=True)) + r")\b")


def _phrase_re(phrases: Mapping[str, float]) -> re.Pattern[str]:
    alts = sorted((re.escape(p.strip()) for p, w in phrases.items() if w > 0), key=len, reverse=True)
    return re.compile(r"(?<![\w'])(?:" + "|".join(alts) + r")(?![\w'])")


_CASUAL_PHRASE_RE = _phrase_re(CASUAL_PHRASES)
_FORMAL_PHRASE_RE = _phrase_re(FORMAL_PHRASES)


def _normalise(text: str) -> str:
    return text.replace("\u2019", "'").replace("\u2018", "'").replace("`", "'").lower()


def _words(lower: str) -> list[str]:
    return _WORD_RE.findall(lower)


def word_count(text: str) -> int:
    """Words as the scorers count them: letters/digits runs, contractions count once."""
    return len(_words(_normalise(text or "")))


def score_verbosity(text: str) -> float:
    """Verbosity in [-1, 1] from the word count on a log scale: tanh(1.4 · ln(words / 37)).

    1 word ≈ -1, 8 ≈ -0.97, 15 ≈ -0.85, 25 ≈ -0.5, 37 = 0, 60 ≈ 0.58, 90 ≈ 0.85, 200+ ≈ 1.
    Markup (markdown bullets, bold, numbers of a list) adds no words except list numbers.
    """
    n = word_count(text)
    if n == 0:
        return -1.0
    return float(math.tanh(VERBOSITY_SLOPE * math.log(n / VERBOSITY_CENTER_WORDS)))


def tone_cues(text: str) -> dict[str, float]:
    """The weighted cue counts behind `score_tone` (for inspection and tests)."""
    lower = _normalise(text or "")
    toks = _words(lower)
    contractions = 0
    casual_tokens = 0.0
    formal_tokens = 0.0
    for tok in toks:
        if "'" in tok:
            if tok in _CASUAL_TOKENS:
                casual_tokens += 1.0
                continue
            if tok.endswith(_CONTRACTION_SUFFIXES) or (tok.endswith("'s") and tok[:-2] in _PRONOUN_S):
                contractions += 1
                continue
        w = CASUAL_WORDS.get(tok)
        if w:
            casual_tokens += w
            continue
        if tok in _CASUAL_TOKENS:
            casual_tokens += 1.0
            continue
        w = FORMAL_WORDS.get(tok)
        if w:
            formal_tokens += w
    casual_phr = sum(CASUAL_PHRASES[m] for m in _CASUAL_PHRASE_RE.findall(lower))
    formal_phr = sum(FORMAL_PHRASES[m] for m in _FORMAL_PHRASE_RE.findall(lower))
    uncontracted = len(_UNCONTRACTED_RE.findall(lower))
    exclaims = len(_EXCLAIM_RE.findall(lower))
    emoji = len(_EMOJI_RE.findall(text or "")) + len(_EMOTICON_RE.findall(text or ""))
    casual = (_CONTRACTION_WEIGHT * contractions + casual_tokens + casual_phr + _EXCLAIM_WEIGHT * exclaims
              + _EMOJI_WEIGHT * emoji)
    formal = _UNCONTRACTED_WEIGHT * uncontracted + formal_tokens + formal_phr
    return {"casual": casual, "formal": formal, "words": float(len(toks)), "contractions": float(contractions),
            "uncontracted": float(uncontracted), "exclaims": float(exclaims), "emoji": float(emoji)}


def score_tone(text: str) -> float:
    """Tone in [-1, 1]: formal (-1) to warm and casual (+1).

    tanh(12.5 · (casual − formal) / (words + 10)): a density of weighted lexical cues, so a
    long formal text full of "you" does not read casual and one "!" in a 300-word answer barely
    moves it. Casual cues: contractions (it's, you'll, don't), "!", emoji and emoticons, slang
    and interjections (hey, honestly, totally, gonna, lol, ...), chatty phrases ("hope that
    helps", "trust me"). Formal cues: uncontracted forms that could be contracted (it is, do
    not, you will), formal words (certainly, furthermore, advisable, assist, ...) and phrases
    ("one should", "allow me", "should you", "in conclusion"). Text without cues scores 0.
    """
    c = tone_cues(text)
    return float(math.tanh(TONE_GAIN * (c["casual"] - c["formal"]) / (c["words"] + TONE_SMOOTHING_WORDS)))


SCORERS = {"verbosity": score_verbosity, "tone": score_tone}


def score_all(text: str) -> dict[str, float]:
    """Gold scores of a text on every axis, keyed by `AXES`."""
    return {axis: SCORERS[axis](text) for axis in AXES}


REPETITION_NGRAM = 3
_REPETITION_TOKEN_RE = re.compile(f"{_WORD_RE.pattern}|{_EMOJI_RE.pattern}")
LOOPING_THRESHOLD = 0.3  # a fluent answer repeats a few three-word phrases (≤ 0.1); a loop repeats most of them


def repetition(text: str, n: int = REPETITION_NGRAM) -> float:
    """Share in [0, 1] of a text's word n-grams that already occurred earlier in it.

    Not a behaviour axis but a guard on them: an LM stuck in a loop ("drei-drei-drei ...") can
    reach any verbosity score, so steering results report this beside the gold scores. Words are
    the scorers' tokens (case-folded, punctuation split off) and each emoji; fewer than n + 1
    tokens score 0.
    """
    toks = _REPETITION_TOKEN_RE.findall((text or "").lower())
    grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
    if len(grams) < 2:
        return 0.0
    return float(1.0 - len(set(grams)) / len(grams))


def is_looping(text: str) -> bool:
    """True when more than `LOOPING_THRESHOLD` of the text's word trigrams are repeats."""
    return repetition(text) > LOOPING_THRESHOLD


COMPRESSION_MIN_CHARS = 300  # shorter texts compress poorly whatever they say


def compression_ratio(text: str) -> float:
    """zlib-compressed size over UTF-8 size (level 9). A second loop measure, blind to how a loop is
    spelled: a decoder that forbids exact repeats can still emit "dree-dreea-dreee ...", which
    `repetition` misses and zlib does not. The generator's answers of `COMPRESSION_MIN_CHARS` or more
    score 0.55-0.71; looping ones fall below 0.4."""
    data = (text or "").encode("utf-8")
    return len(zlib.compress(data, 9)) / len(data) if data else 1.0


# ---------------------------------------------------------------------------------------------
# Response generator
# ---------------------------------------------------------------------------------------------

MAX_WORDS = 130


def register_probs(tone: float) -> tuple[float, float, float]:
    """P(formal), P(neutral), P(casual) of one phrasing slot at a tone in [-1, 1]."""
    t = float(np.clip(tone, -1.0, 1.0))
    pf, pc = ((1 - t) / 2) ** 2, ((1 + t) / 2) ** 2
    return pf, 1.0 - pf - pc, pc


def target_words(verbosity: float) -> float:
    """Median length a response aims at: 37 · e^(0.9 v) words (≈15 at -1, ≈91 at +1)."""
    return VERBOSITY_CENTER_WORDS * math.exp(0.9 * float(np.clip(verbosity, -1.0, 1.0)))


_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


class _Slots:
    """Draws registers and phrases for one response (all randomness through one numpy rng)."""

    def __init__(self, tone: float, rng: np.random.Generator) -> None:
        self.rng = rng
        self.tone = float(np.clip(tone, -1.0, 1.0))
        self.cum = np.cumsum(register_probs(self.tone))
        self.used: set[str] = set()
        self.u = float(rng.random())

    def stratified(self) -> float:
        """The next of a golden-ratio sequence with a random start: uniform per slot, but spread
        evenly across the slots of one response, so the register mix of a response tracks its
        tone closely even when it has only a few slots."""
        self.u = (self.u + _GOLDEN) % 1.0
        return self.u

    def register(self) -> str:
        u = self.stratified()
        return FORMAL if u < self.cum[0] else (NEUTRAL if u < self.cum[1] else CASUAL)

    def pick(self, bank: dict[str, list[str]], reg: str | None = None) -> tuple[str, str]:
        """A phrase of one register; phrases already used in this response are re-drawn."""
        reg = reg or self.register()
        options = bank[reg]
        for _ in range(8):
            phrase = options[int(self.rng.integers(len(options)))]
            lead = phrase.lstrip("^").split("{", 1)[0].strip(" ,:?!.").lower()  # "trust me" of "Trust me, {x}!"
            if phrase not in self.used and lead not in self.used:
                break
        self.used.add(phrase)
        if len(lead) >= 4:
            self.used.add(lead)
        return phrase, reg


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:] if s else s


def _decap(s: str) -> str:
    first = s.split(" ", 1)[0].rstrip(",:?!.")
    if first in ("I", "I'd", "I'm", "I'll", "I've"):
        return s
    return s[:1].lower() + s[1:]


@dataclass
class _Part:
    kind: str  # opener | intro | tip | summary | closer
    text: str
    reg: str
    words: int
    tip_index: int = -1
    reason: str = ""  # for tips: the reason text, attached if selected
    reason_words: int = 0
    label: bool = False  # tip frame is a label ("Pro tip: ...") and takes no connective
    tip: str = ""  # for tips: the tip's own text


def _frame_tip(frame: str, body: str) -> str:
    return frame.lstrip("^").replace("{X}", _cap(body)).replace("{x}", body)


def render_response(request: Request | str, style: Mapping[str, float], rng: np.random.Generator) -> str:
    """A response to `request` at a point of the behaviour square.

    request: a `Request`, or the text or id of one in `REQUESTS`.
    style: {"verbosity": v, "tone": t}, each in [-1, 1] (missing axes default to 0).
    The response aims at `target_words(v)` words (±8 % log-normal jitter, at most 125): parts
    are taken in a lightly shuffled priority order (first tip, opener, second tip, closer,
    first reason, intro, more tips and reasons, summary) while each one brings the length
    closer to the target, then laid out as opener, intro, tips (with connectives and
    reasons), summary, closer. Deterministic given the rng state.
    """
    req = _as_request(request)
    v = float(np.clip(style.get("verbosity", 0.0), -1.0, 1.0))
    t = float(np.clip(style.get("tone", 0.0), -1.0, 1.0))
    slots = _Slots(t, rng)
    target = min(target_words(v) * math.exp(0.08 * rng.standard_normal()), 125.0)

    topic = req.topic
    order = rng.permutation(len(topic.tips))[:5]
    tips = [topic.tips[i] for i in order]

    parts: dict[str, _Part] = {}
    opener, reg = slots.pick(OPENERS)
    parts["opener"] = _Part("opener", opener, reg, len(opener.split()))
    intro, reg = slots.pick(INTROS)
    intro = intro.format(goal=topic.goal)
    parts["intro"] = _Part("intro", intro, reg, len(intro.split()))
    summary, reg = slots.pick(SUMMARIES)
    parts["summary"] = _Part("summary", summary, reg, len(summary.split()))
    closer, reg = slots.pick(CLOSERS)
    parts["closer"] = _Part("closer", closer, reg, len(closer.split()))
    for i, tip in enumerate(tips):
        frame, reg = slots.pick(TIP_FRAMES)
        if i == 0 and frame.startswith("Another"):
            frame = "Try to {x}."
        n_frame = len(frame.replace("{x}", "").replace("{X}", "").split())
        parts[f"tip{i}"] = _Part("tip", frame, reg, n_frame + len(tip.text.split()), tip_index=i,
                                 reason=tip.reason, reason_words=len(tip.reason.split()) + 2,
                                 label=frame.startswith("^"), tip=tip.text)

    # Priority of parts: what a response of a given length includes first. One response in five
    # goes without an opener.
    priority = ["tip0", "opener", "tip1", "closer", "reason0", "intro", "tip2", "reason1", "tip3", "reason2",
                "summary", "tip4", "reason3", "reason4"]
    if rng.random() < 0.2:
        priority.remove("opener")
    for _ in range(4):  # a little shuffling of neighbours, keeping each reason after its tip
        j = int(rng.integers(1, len(priority) - 1))
        a, b = priority[j], priority[j + 1]
        if not (b.startswith("reason") and a == "tip" + b[-1]):
            priority[j], priority[j + 1] = b, a

    chosen: set[str] = set()
    total = 0
    for key in priority:
        if key.startswith("reason"):
            k = int(key[-1])
            if f"tip{k}" not in chosen:
                continue
            w = parts[f"tip{k}"].reason_words
        else:
            w = parts[key].words
        if key != "tip0" and abs(total + w - target) >= abs(total - target):
            break
        chosen.add(key)
        total += w

    text = _assemble(parts, chosen, len(tips), slots, t)
    while word_count(text) > MAX_WORDS:  # rare: trim the optional parts
        for key in ("summary", "intro", "reason4", "reason3", "tip4", "reason2", "tip3"):
            if key in chosen:
                chosen.discard(key)
                break
        else:
            break
        text = _assemble(parts, chosen, len(tips), slots, t)
    return text


def _assemble(parts: dict[str, _Part], chosen: set[str], n_tips: int, slots: _Slots, t: float) -> str:
    rng = slots.rng
    sentences: list[tuple[str, str]] = []  # (sentence, register)
    if "opener" in chosen:
        sentences.append((parts["opener"].text, parts["opener"].reg))
    if "intro" in chosen:
        sentences.append((parts["intro"].text, parts["intro"].reg))
    tip_keys = [f"tip{i}" for i in range(n_tips) if f"tip{i}" in chosen]
    combine = (len(tip_keys) == 2 and not any(f"reason{k[-1]}" in chosen for k in tip_keys)
               and rng.random() < 0.5)
    if combine:
        p0, p1 = parts[tip_keys[0]], parts[tip_keys[1]]
        tip_texts = [_tip_text(parts, k) for k in tip_keys]
        sentences.append((_frame_tip(p0.text, f"{tip_texts[0]} and {tip_texts[1]}"), p0.reg))
    else:
        for pos, key in enumerate(tip_keys):
            part = parts[key]
            body = _tip_text(parts, key)
            reason_sentence = None
            if f"reason{key[-1]}" in chosen:
                rtext, rreg = slots.pick(REASON_INLINE) if rng.random() < 0.5 else (None, "")
                if rtext is not None:
                    body = body + rtext.replace("{r}", part.reason)
                else:
                    rframe, rreg = slots.pick(REASON_SENTENCES)
                    reason_sentence = (_cap(rframe.replace("{r}", part.reason)), rreg)
            sentence = _frame_tip(part.text, body)
            if pos > 0 and not part.label and rng.random() < 0.65:
                conn, creg = slots.pick(CONNECTIVES)
                if pos == len(tip_keys) - 1 and len(tip_keys) >= 3 and rng.random() < 0.4:
                    conn = {FORMAL: "Finally,", NEUTRAL: "Lastly,", CASUAL: "And last but not least,"}[creg]
                sentence = f"{conn} {_decap(sentence)}"
            sentences.append((sentence, part.reg))
            if reason_sentence is not None:
                sentences.append(reason_sentence)
    if "summary" in chosen:
        sentences.append((parts["summary"].text, parts["summary"].reg))
    if "closer" in chosen:
        sentences.append((parts["closer"].text, parts["closer"].reg))

    # Formal sentences keep their uncontracted forms and full stops; the others contract with
    # probability (1 + t) / 2 and end in "!" with probability max(t, 0) / 4.
    p_bang, p_contract = 0.25 * max(t, 0.0), (1 + t) / 2
    out = []
    for s, reg in sentences:
        if reg != FORMAL:
            if s.endswith(".") and slots.stratified() < p_bang:
                s = s[:-1] + "!"
            s = _contract(s, p_contract, slots)
        out.append(s)
    return " ".join(out)


def _tip_text(parts: dict[str, _Part], key: str) -> str:
    return parts[key].tip


def _contract(text: str, p: float, slots: _Slots) -> str:
    """Contract each contractible form ("it is" -> "it's") with probability p (stratified)."""
    if p <= 0:
        return text

    def sub(m: re.Match[str]) -> str:
        if slots.stratified() >= p:
            return m.group(0)
        src = m.group(0)
        out = _CONTRACTIONS[src.lower()]
        if out.startswith("i'"):
            return "I" + out[1:]
        return _cap(out) if src[:1].isupper() else out

    return _CONTRACT_RE.sub(sub, text)


def _as_request(request: Request | str) -> Request:
    if isinstance(request, Request):
        return request
    try:
        return REQUEST_BY_TEXT[request]
    except KeyError:
        if request in REQUEST_BY_ID:
            return REQUEST_BY_ID[request]
        raise KeyError(f"unknown request {request!r}: pass a Request or the text/id of one in REQUESTS") from None


# ---------------------------------------------------------------------------------------------
# Users
# ---------------------------------------------------------------------------------------------


def _weights(user: str | Sequence[float] | Mapping[str, float]) -> np.ndarray:
    if isinstance(user, str):
        try:
            return np.asarray(ARCHETYPES[user], dtype=np.float64)
        except KeyError:
            raise KeyError(f"unknown archetype {user!r}; known: {list(ARCHETYPES)}") from None
    if isinstance(user, Mapping):
        return np.asarray([float(user.get(a, 0.0)) for a in AXES], dtype=np.float64)
    w = np.asarray(user, dtype=np.float64)
    if w.shape != (len(AXES),):
        raise ValueError(f"a user's weights need one value per axis {AXES}, got shape {w.shape}")
    return w


def _attr_vector(attributes: Mapping[str, float] | Sequence[float]) -> np.ndarray:
    if isinstance(attributes, Mapping):
        return np.asarray([float(attributes[a]) for a in AXES], dtype=np.float64)
    return np.asarray(attributes, dtype=np.float64)


def utility(user: str | Sequence[float] | Mapping[str, float],
            attributes: Mapping[str, float] | Sequence[float] | str) -> float:
    """w · s: a user's (archetype name or weight vector) utility for a response.

    `attributes` are the response's gold scores ({axis: score}, or a vector in `AXES` order);
    pass the text itself to score it first.
    """
    s = _attr_vector(score_all(attributes) if isinstance(attributes, str) else attributes)
    return float(_weights(user) @ s)


def btl_choice(u_a: float, u_b: float, temperature: float, rng: np.random.Generator | None = None) -> float:
    """0 if a is chosen, 1 if b: P(b) = sigmoid((u_b − u_a) / temperature).

    Temperature 0 chooses the larger utility deterministically (0.5 on an exact tie); no rng
    is needed then.
    """
    d = u_b - u_a
    if temperature <= 0:
        return 1.0 if d > 0 else (0.0 if d < 0 else 0.5)
    if rng is None:
        raise ValueError("a temperature above 0 needs an rng")
    p_b = 1.0 / (1.0 + math.exp(-max(min(d / temperature, 50.0), -50.0)))
    return 1.0 if rng.random() < p_b else 0.0


def sample_user(rng: np.random.Generator, prior: str = "square") -> tuple[float, ...]:
    """A continuous user's weight vector over `AXES`.

    prior: "square" (uniform on [-1, 1]^d), "sphere" (uniform direction, unit norm), "edge" (a
    uniform direction scaled onto the square's boundary: max |w_i| = 1, so the corners are the
    archetypes) or "archetype" (one of the corners in `ARCHETYPES`).
    """
    d = len(AXES)
    if prior == "square":
        w = rng.uniform(-1.0, 1.0, d)
    elif prior in ("sphere", "edge"):
        w = rng.standard_normal(d)
        w = w / max(float(np.abs(w).max() if prior == "edge" else np.linalg.norm(w)), 1e-12)
    elif prior == "archetype":
        names = list(ARCHETYPES)
        w = np.asarray(ARCHETYPES[names[int(rng.integers(len(names)))]])
    else:
        raise ValueError(f"unknown prior {prior!r}; expected 'square', 'sphere' or 'archetype'")
    return tuple(float(x) for x in w)


# ---------------------------------------------------------------------------------------------
# Pairs
# ---------------------------------------------------------------------------------------------


@dataclass
class PersonaConfig:
    """How `generate_pairs` and `corpus` draw the persona world (everything keyed by `seed`)."""

    seed: int = 0
    n_pairs_per_request: int = 20
    conflict_rate: float = 0.5  # share of pairs on which the opposite pairs of `conflict_axis` disagree
    conflict_axis: str = "verbosity"
    choice_temperature: float = 0.1  # BTL temperature of the archetypes' choices; 0 = deterministic
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train/val/test, over requests
    min_margin: float = 0.1  # every archetype's |u_b − u_a| is at least this (gold-score units)
    user_types: tuple[str, ...] = tuple(ARCHETYPES)  # archetypes whose choices are written
    corpus_corner_fraction: float = 0.2  # corpus(): share of styles drawn at the exact corners
    max_tries: int = 400  # style re-draws per pair before giving up

    def __post_init__(self) -> None:
        self.split_fractions = tuple(float(f) for f in self.split_fractions)  # type: ignore[assignment]
        self.user_types = tuple(self.user_types)
        if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.n_pairs_per_request < 1:
            raise ValueError(f"n_pairs_per_request must be >= 1, got {self.n_pairs_per_request}")
        if not 0.0 <= self.conflict_rate <= 1.0:
            raise ValueError(f"conflict_rate must be in [0, 1], got {self.conflict_rate}")
        _axis_index(self.conflict_axis)
        if self.choice_temperature < 0:
            raise ValueError(f"choice_temperature must be >= 0, got {self.choice_temperature}")
        if len(self.split_fractions) != 3 or min(self.split_fractions) < 0 \
                or abs(sum(self.split_fractions) - 1.0) > 1e-6:
            raise ValueError(f"split_fractions must be three non-negative numbers summing to 1, "
                             f"got {self.split_fractions}")
        if not 0.0 <= self.min_margin < 1.0:
            raise ValueError(f"min_margin must be in [0, 1), got {self.min_margin}")
        unknown = [u for u in self.user_types if u not in ARCHETYPES]
        if unknown or not self.user_types:
            raise ValueError(f"user_types must be archetype names from {list(ARCHETYPES)}, got {self.user_types}")
        if not 0.0 <= self.corpus_corner_fraction <= 1.0:
            raise ValueError(f"corpus_corner_fraction must be in [0, 1], got {self.corpus_corner_fraction}")


def request_splits(cfg: PersonaConfig) -> dict[str, str]:
    """Request id -> split; a seeded permutation of the requests cut by `split_fractions`."""
    n = len(REQUESTS)
    perm = np.random.default_rng([cfg.seed, 1]).permutation(n)
    n_train = int(round(cfg.split_fractions[0] * n))
    n_val = int(round(cfg.split_fractions[1] * n))
    out = {}
    for rank, i in enumerate(perm):
        out[REQUESTS[i].id] = "train" if rank < n_train else ("val" if rank < n_train + n_val else "test")
    return out


def split_requests(cfg: PersonaConfig, split: str) -> list[Request]:
    """The requests of one split, in `REQUESTS` order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    splits = request_splits(cfg)
    return [r for r in REQUESTS if splits[r.id] == split]


_ARCH_INDEX = {name: i for i, name in enumerate(ARCHETYPES)}
_ALL_WEIGHTS = np.asarray([ARCHETYPES[n] for n in ARCHETYPES], dtype=np.float64)  # (U, d)


def _conflict_ok(delta: np.ndarray, conflict: bool, pairs: Sequence[tuple[str, str]], margin: float) -> bool:
    """delta: attributes of b minus a. Every archetype pair in `pairs` disagrees (conflict) or
    every one agrees, and every archetype's utility difference is at least `margin` from a tie."""
    du = _ALL_WEIGHTS @ delta  # (U,) u_b - u_a per archetype
    if np.min(np.abs(du)) < margin:
        return False
    return all(((du[_ARCH_INDEX[a]] > 0) != (du[_ARCH_INDEX[b]] > 0)) == conflict for a, b in pairs)


def _rounded_scores(text: str) -> dict[str, float]:
    """Gold scores rounded to 4 decimals and to float32 (what a pairs file stores, exactly)."""
    return {k: float(np.float32(round(v, 4))) for k, v in score_all(text).items()}


def _draw_pair(req: Request, conflict: bool, cfg: PersonaConfig, rng: np.random.Generator,
               pairs: Sequence[tuple[str, str]]) -> tuple[str, str, dict[str, float], dict[str, float]]:
    d = len(AXES)
    for _ in range(cfg.max_tries):
        sa, sb = rng.uniform(-1.0, 1.0, d), rng.uniform(-1.0, 1.0, d)
        # cheap check on the style coordinates first (scores track them closely)
        if not _conflict_ok(sb - sa, conflict, pairs, cfg.min_margin + 0.1):
            continue
        a = render_response(req, dict(zip(AXES, sa)), rng)
        b = render_response(req, dict(zip(AXES, sb)), rng)
        if a == b:
            continue
        att_a, att_b = _rounded_scores(a), _rounded_scores(b)
        delta = _attr_vector(att_b) - _attr_vector(att_a)
        if _conflict_ok(delta, conflict, pairs, cfg.min_margin):
            return a, b, att_a, att_b
    raise RuntimeError(f"no pair for request {req.id!r} met the conflict={conflict} constraint with margin "
                       f"{cfg.min_margin} in {cfg.max_tries} tries; lower min_margin")


def generate_pairs(cfg: PersonaConfig | None = None) -> list[dict[str, Any]]:
    """Pairs records in the JSONL contract, `n_pairs_per_request` per request, in request order.

    round(conflict_rate · n) pairs (a seeded choice) are conflicting: on them every archetype
    pair in `opposite_pairs(conflict_axis)` disagrees; on the others they all agree.
    Choices are BTL draws at `choice_temperature` from utilities w · attributes.
    """
    cfg = cfg or PersonaConfig()
    K = cfg.n_pairs_per_request
    n = len(REQUESTS) * K
    flags = np.zeros(n, dtype=bool)
    flags[np.random.default_rng([cfg.seed, 2]).permutation(n)[: int(round(cfg.conflict_rate * n))]] = True
    splits = request_splits(cfg)
    pairs = opposite_pairs(cfg.conflict_axis)
    user_w = {u: _weights(u) for u in cfg.user_types}
    records: list[dict[str, Any]] = []
    for r, req in enumerate(REQUESTS):
        for k in range(K):
            rng = np.random.default_rng([cfg.seed, 3, r, k])
            a, b, att_a, att_b = _draw_pair(req, bool(flags[r * K + k]), cfg, rng, pairs)
            va, vb = _attr_vector(att_a), _attr_vector(att_b)
            choices = {u: _choice_out(btl_choice(float(w @ va), float(w @ vb), cfg.choice_temperature, rng))
                       for u, w in user_w.items()}
            records.append({
                "id": f"pw{cfg.seed}-{req.id}-{k:03d}", "prompt": req.text, "a": a, "b": b,
                "choices": choices, "attributes": {"a": att_a, "b": att_b}, "split": splits[req.id],
            })
    return records


def _choice_out(c: float) -> float | int:
    return 0.5 if c == 0.5 else int(c)


def generate_pairset(cfg: PersonaConfig | None = None) -> PairSet:
    """`generate_pairs` validated into a PairSet (as `load_pairs` would read it back)."""
    cfg = cfg or PersonaConfig()
    return pairs_from_records(generate_pairs(cfg),
                              source=f"personas[seed={cfg.seed},conflict={cfg.conflict_rate:g}]")


def utility_differences(data: PairSet | Iterable[Mapping[str, Any]], user: str | Sequence[float]) -> np.ndarray:
    """(n,) u_b − u_a of a user on every pair, from the recorded attributes."""
    w = _weights(user)
    if isinstance(data, PairSet):
        if data.attributes is None:
            raise ValueError(f"{data.source}: no attributes")
        idx = [data.attribute_names.index(a) for a in AXES]
        att = data.attributes[:, :, idx].astype(np.float64)  # (n, 2, d)
        return (att[:, 1] - att[:, 0]) @ w
    return np.asarray([w @ (_attr_vector(r["attributes"]["b"]) - _attr_vector(r["attributes"]["a"]))
                       for r in data])


def conflict_rate(data: PairSet | Sequence[Mapping[str, Any]], type_a: str, type_b: str) -> float:
    """Share of pairs on which two archetypes' utility differences have opposite signs."""
    da, db = utility_differences(data, type_a), utility_differences(data, type_b)
    return float(np.mean(np.sign(da) * np.sign(db) < 0)) if len(da) else float("nan")


def measured_conflict_rate(data: PairSet | Sequence[Mapping[str, Any]], axis: str = "verbosity") -> float:
    """Mean `conflict_rate` over `opposite_pairs(axis)` (what `conflict_rate` in the config sets)."""
    data = data if isinstance(data, PairSet) else list(data)
    return float(np.mean([conflict_rate(data, a, b) for a, b in opposite_pairs(axis)]))


# ---------------------------------------------------------------------------------------------
# LM training corpus
# ---------------------------------------------------------------------------------------------

CORNERS: tuple[tuple[float, ...], ...] = tuple(ARCHETYPES.values())


def corpus(cfg: PersonaConfig | None = None, n: int = 1000, split: str = "train") -> list[tuple[str, dict, str]]:
    """n (prompt, style, response) triples for LM training, from the requests of one split only.

    Styles: with probability `corpus_corner_fraction` an exact corner of the square, else
    uniform on [-1, 1]^d (coordinates rounded to 3 decimals; the response is rendered at the
    rounded style). Deterministic in (cfg.seed, split, n).
    """
    cfg = cfg or PersonaConfig()
    reqs = split_requests(cfg, split)
    if not reqs:
        raise ValueError(f"split {split!r} has no requests with split_fractions={cfg.split_fractions}")
    rng = np.random.default_rng([cfg.seed, 4, SPLITS.index(split)])
    out = []
    for _ in range(n):
        req = reqs[int(rng.integers(len(reqs)))]
        if rng.random() < cfg.corpus_corner_fraction:
            coords = CORNERS[int(rng.integers(len(CORNERS)))]
        else:
            coords = tuple(rng.uniform(-1.0, 1.0, len(AXES)))
        style = {a: round(float(c), 3) for a, c in zip(AXES, coords)}
        out.append((req.text, style, render_response(req, style, rng)))
    return out


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m core.data.personas",
                                 description="Write the persona-world preference pairs (JSONL contract).")
    ap.add_argument("--out", required=True, help="output .jsonl file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pairs-per-request", type=int, default=PersonaConfig.n_pairs_per_request)
    ap.add_argument("--conflict", type=float, default=PersonaConfig.conflict_rate,
                    help="share of pairs on which the opposite archetype pairs disagree")
    ap.add_argument("--conflict-axis", default=PersonaConfig.conflict_axis, choices=AXES)
    ap.add_argument("--temperature", type=float, default=PersonaConfig.choice_temperature,
                    help="BTL temperature of the archetypes' choices (0 = deterministic)")
    args = ap.parse_args(argv)
    try:
        cfg = PersonaConfig(seed=args.seed, n_pairs_per_request=args.pairs_per_request,
                            conflict_rate=args.conflict, conflict_axis=args.conflict_axis,
                            choice_temperature=args.temperature)
    except ValueError as e:
        ap.error(str(e))
    t0 = time.perf_counter()
    ps = generate_pairset(cfg)
    dt = time.perf_counter() - t0
    path = write_pairs(args.out, ps)
    print(f"wrote {len(ps)} pairs ({len(REQUESTS)} requests x {cfg.n_pairs_per_request}, {len(TOPICS)} topics) "
          f"to {path} in {dt:.1f}s")
    req_splits = request_splits(cfg)
    for s in SPLITS:
        n_req = sum(1 for v in req_splits.values() if v == s)
        print(f"  {s:5s}: {len(ps.indices(s)):6d} pairs, {n_req:4d} requests")
    print(f"conflict rate (configured {cfg.conflict_rate:g}, axis {cfg.conflict_axis}):")
    for a, b in opposite_pairs(cfg.conflict_axis) + list(DIAGONAL_PAIRS):
        choice_dis = float(ps.conflicting(a, b).mean()) if a in ps.user_types and b in ps.user_types else float("nan")
        print(f"  {a} vs {b}: utilities disagree on {conflict_rate(ps, a, b):.3f}, "
              f"choices on {choice_dis:.3f} (temperature {cfg.choice_temperature:g})")
    print(f"measured conflict rate: {measured_conflict_rate(ps, cfg.conflict_axis):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
