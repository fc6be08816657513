-- Demo data for the local stack: a building, resources, and two visitors' carts.
-- Session ids: demo-session-1 (two applications), demo-session-2 (one application).
INSERT INTO bb_activity (id, name, description) VALUES (1, 'Idrett', 'Sport og trening');
INSERT INTO bb_building (id, activity_id, name, homepage) VALUES (1, 1, 'Fana kulturhus', 'https://example.no');
INSERT INTO bb_resource (id, name, activity_id, rescategory_id, simple_booking)
  VALUES (1, 'Storsal', 1, 1, 1), (2, 'Møterom &amp; kjøkken', 1, NULL, NULL);
INSERT INTO bb_building_resource (building_id, resource_id) VALUES (1, 1), (1, 2);
INSERT INTO bb_agegroup (id, activity_id, name, sort) VALUES (1, 1, 'Barn', 1), (2, 1, 'Voksne', 2);
INSERT INTO bb_targetaudience (id, activity_id, name, sort) VALUES (1, 1, 'Alle', 1);
INSERT INTO fm_ecomva (id, percent_, descr) VALUES (0, 0, 'Ingen mva'), (3, 25, 'Høy sats');
INSERT INTO bb_article_category (id, name) VALUES (1, 'resource'), (2, 'service');
INSERT INTO bb_service (id, name) VALUES (1, 'Kaffe &amp; te');
INSERT INTO bb_article_mapping (id, article_cat_id, article_id, article_code, unit, tax_code)
  VALUES (1, 1, 1, 'STORSAL', 'hour', 3), (2, 2, 1, 'KAFFE', 'each', 3);
SELECT setval('bb_activity_id_seq', 10), setval('bb_building_id_seq', 10),
       setval('bb_resource_id_seq', 10), setval('bb_agegroup_id_seq', 10),
       setval('bb_targetaudience_id_seq', 10), setval('bb_article_category_id_seq', 10),
       setval('bb_service_id_seq', 10), setval('bb_article_mapping_id_seq', 10);

INSERT INTO bb_application (id, status, modified, building_name, building_id, activity_id, name,
                            contact_name, contact_email, contact_phone, secret, owner_id, session_id)
VALUES (1, 'NEWPARTIAL1', '2025-05-12 11:50:00', 'Fana kulturhus', 1, 1, 'Korpsøving',
        'Kari Nordmann', 'kari@example.no', '12345678', 'demo-secret-1', 0, 'demo-session-1'),
       (2, 'NEWPARTIAL1', '2025-05-12 11:52:00', 'Fana kulturhus', 1, 1, 'Kaffe etter øving',
        'Kari Nordmann', 'kari@example.no', '12345678', 'demo-secret-2', 0, 'demo-session-1'),
       (3, 'NEWPARTIAL1', '2025-05-12 12:00:00', 'Fana kulturhus', 1, 1, 'Bursdag',
        'Ola Nordmann', 'ola@example.no', '87654321', 'demo-secret-3', 0, 'demo-session-2');
SELECT setval('bb_application_id_seq', 100);
INSERT INTO bb_application_date (application_id, from_, to_)
  VALUES (1, '2025-06-03 17:00:00', '2025-06-03 19:00:00'),
         (2, '2025-06-03 19:00:00', '2025-06-03 19:30:00'),
         (3, '2025-12-06 12:00:00', '2025-12-06 15:00:00');
INSERT INTO bb_application_resource (application_id, resource_id) VALUES (1, 1), (2, 2), (3, 1);
INSERT INTO bb_application_agegroup (application_id, agegroup_id, male, female) VALUES (1, 1, 5, 7), (1, 2, 1, 1);
INSERT INTO bb_application_targetaudience (application_id, targetaudience_id) VALUES (1, 1);
INSERT INTO bb_purchase_order (id, application_id) VALUES (1, 1), (2, 2);
SELECT setval('bb_purchase_order_id_seq', 100);
INSERT INTO bb_purchase_order_line (order_id, parent_mapping_id, article_mapping_id, unit_price, currency,
                                    quantity, amount, tax_code, tax)
  VALUES (1, 1, 1, 250.00, 'NOK', 2.00, 500.00, 3, 125.00),
         (2, 1, 2, 20.00, 'NOK', 12.00, 240.00, 3, 60.00);
